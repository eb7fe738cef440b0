"""The package's structure: no import cycle among dgjax modules, and the layers hold (maths
modules import no method or engine module; algorithm families import only maths and
``dgjax.core``). Read from the sources (``ast``), so nothing is imported or run."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dgjax"

#: The bottom layer: pure maths, no method protocol, no engine.
MATHS = {
  "dgjax.losses",
  "dgjax.per_domain",
  "dgjax.masks",
  "dgjax.penalties",
  "dgjax.hessian",
  "dgjax.seeding",
  "dgjax.types",
}


def module_name(path: Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def dgjax_imports(path: Path) -> set[str]:
  """The dgjax modules ``path`` imports (at any level: function-level imports count too)."""
  names = set()
  modules = {module_name(p) for p in ROOT.rglob("*.py")}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
      names |= submodules or {node.module}  # `from dgjax import masks` imports dgjax.masks
  return {n for n in names if n in modules and n != module_name(path)}


GRAPH = {module_name(p): dgjax_imports(p) for p in ROOT.rglob("*.py")}


def find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt == "dgjax":  # the package's own __init__ re-exports; it imports leaves only
        continue
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MATHS))
def test_maths_modules_import_only_maths(module):
  assert GRAPH[module] <= MATHS, f"{module} imports {sorted(GRAPH[module] - MATHS)}"


def test_algorithm_families_import_only_maths_and_the_protocol():
  families = [m for m in GRAPH if m.startswith("dgjax.algorithms.")]
  assert families
  for m in families:
    extra = {
      i
      for i in GRAPH[m]
      if i not in MATHS | {"dgjax.core", "dgjax.models", "dgjax.conv"}
      and not i.startswith("dgjax.algorithms")
    }  # sibling families share helpers
    assert not extra, f"{m} imports {sorted(extra)}"


def test_submodules_are_reachable_from_the_package():
  import subprocess
  import sys

  code = (
    "import dgjax; assert dgjax.models.mlp and dgjax.data.load_mnist and dgjax.train.train_many "
    "and dgjax.sharding.make_mesh and dgjax.methods.METHODS; import sys; "
    "assert 'orbax.checkpoint' not in sys.modules, 'import dgjax must stay light'"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
