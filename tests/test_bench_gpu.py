"""bench/gpu.py, the prepared GPU run, at toy sizes on the CPU: every section runs and
appends its table to the results file, the run leaves JAX's cache settings as it found them,
and the full-size plan is the one the GPU run promises."""

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu  # noqa: E402


def test_every_section_runs_at_toy_sizes_and_appends_its_table(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# earlier results\n")
  cache_dir = jax.config.jax_compilation_cache_dir
  assert gpu.main(["--toy", "--results", str(results)]) == 0
  assert jax.config.jax_compilation_cache_dir == cache_dir
  text = results.read_text()
  assert text.startswith("# earlier results\n\n## GPU run (`bench/gpu.py --toy`)")
  assert "failed" not in text and "skipped" not in text
  tables = text.split("\n### ")[1:]
  assert len(tables) == len(gpu.SECTIONS)
  expected = [
    "| erm | ",  # methods
    "| erm bfloat16 remat | ",  # resnet
    "| grain train_batches, 0 worker(s) | ",  # input
    "| 2 runs, one vmapped program | ",  # sweep
    "| 5 | 3 | ",  # cmnist5001: 5 steps, evaluations at 0, 2 and 4
  ]
  for table, row in zip(tables, expected):
    assert row in table, (row, table)
    numbers = [c for line in table.splitlines() if line.startswith("| ") for c in line.split("|")]
    assert "nan" not in numbers


def test_the_gpu_plan():
  full = gpu.Sizes(toy=False)
  assert full.methods is None and (full.cnn_batch, full.image) == (64, 28)
  assert (full.resnet_arch, full.resnet_size, full.resnet_domains, full.resnet_batch) == (
    "resnet50",
    224,
    3,
    32,
  )
  assert full.resnet_methods == ["erm", "sand", "hgp"] and full.augment
  assert sorted(full.resnet_settings) == [
    ("bfloat16", False),
    ("bfloat16", True),
    ("float32", False),
    ("float32", True),
  ]
  assert full.input["workers"][-1] == (gpu.os.cpu_count() or 1)
  assert (full.sweep_runs, full.long_steps, full.long_freq, full.env_size) == (20, 5001, 100, 23333)
