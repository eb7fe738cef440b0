"""The command lines' persistent compilation cache (dgjax.compilation_cache): where it goes
(flag, then DGJAX_COMPILATION_CACHE, then ~/.cache/dgjax/jax; empty or 'off' disables),
that experiments.train and experiments.sweep set it up before any work, and that this jax
writes and reads CPU programs there. In process: JAX's cache settings are restored after
each test."""

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from dgjax import compilation_cache as cc

JAX_KEYS = (
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def jax_settings():
  """JAX's cache settings as the test found them, afterwards; the cache off meanwhile."""
  saved = {k: getattr(jax.config, k) for k in JAX_KEYS}
  jax.config.update("jax_compilation_cache_dir", None)
  jax_cache.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  jax_cache.reset_cache()


def test_resolve_flag_then_variable_then_default(tmp_path):
  home = {"HOME": str(tmp_path)}
  assert cc.resolve(None, {"XDG_CACHE_HOME": "/x"}) == (cc.Path("/x/dgjax/jax"), "default")
  default, source = cc.resolve(None, {})
  assert source == "default" and default.parts[-3:] == (".cache", "dgjax", "jax")
  assert cc.resolve(None, {cc.ENV_VAR: "/e", **home}) == (cc.Path("/e"), "env")
  assert cc.resolve("/f", {cc.ENV_VAR: "/e"}) == (cc.Path("/f"), "flag")
  for off in ("", "off", "OFF", " none "):
    assert cc.resolve(None, {cc.ENV_VAR: off}) == (None, "env")
    assert cc.resolve(off, {cc.ENV_VAR: "/e"}) == (None, "flag")
  assert cc.resolve("off", {}) == (None, "flag")  # the flag wins over the default too
  assert cc.resolve("/f", {cc.ENV_VAR: "off"}) == (cc.Path("/f"), "flag")


def test_setup_errors_name_the_source_and_the_default_only_warns(tmp_path, jax_settings):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(cc.CompilationCacheError, match="--compilation_cache=.*file/jax.*'off'"):
    cc.setup(str(blocker / "jax"), {})
  with pytest.raises(cc.CompilationCacheError, match=f"{cc.ENV_VAR}=.*is not a directory"):
    cc.setup(None, {cc.ENV_VAR: str(blocker)})
  with pytest.warns(UserWarning, match="compilation cache off: the default directory"):
    assert cc.setup(None, {"XDG_CACHE_HOME": str(blocker)}) is None
  assert jax.config.jax_compilation_cache_dir is None
  assert cc.setup(None, {cc.ENV_VAR: "off"}) is None
  assert jax.config.jax_compilation_cache_dir is None


def _train_cache_dir(argv, monkeypatch, env):
  """experiments.train's own start-up with ``argv``, stopped by a bad --method right after
  the cache setup (exit 2, nothing else done); the cache directory JAX was given."""
  from experiments import train as train_cli

  for k, v in env.items():
    monkeypatch.setenv(k, v)
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["train", "--method=no_such_method", *argv])
    with pytest.raises(SystemExit) as e:
      train_cli._main(["train"])
    assert e.value.code == 2
  finally:
    flags.FLAGS.unparse_flags()
  return jax.config.jax_compilation_cache_dir


def test_entry_point_honours_flag_variable_and_off(tmp_path, monkeypatch, capsys, jax_settings):
  flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
  assert _train_cache_dir([], monkeypatch, {cc.ENV_VAR: str(env_dir)}) == str(env_dir)
  assert env_dir.is_dir() and jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  jax.config.update("jax_compilation_cache_dir", None)
  got = _train_cache_dir([f"--compilation_cache={flag_dir}"], monkeypatch, {cc.ENV_VAR: "off"})
  assert got == str(flag_dir) and flag_dir.is_dir()
  jax.config.update("jax_compilation_cache_dir", None)
  assert _train_cache_dir(["--compilation_cache=off"], monkeypatch, {}) is None
  assert _train_cache_dir([], monkeypatch, {cc.ENV_VAR: ""}) is None
  monkeypatch.delenv(cc.ENV_VAR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert _train_cache_dir([], monkeypatch, {}) == str(tmp_path / "xdg" / "dgjax" / "jax")
  jax.config.update("jax_compilation_cache_dir", None)
  (tmp_path / "ro").write_text("")  # a file where the directory should be: exit 2, said
  assert _train_cache_dir([f"--compilation_cache={tmp_path / 'ro'}"], monkeypatch, {}) is None
  assert "error: compilation cache --compilation_cache=" in capsys.readouterr().err


def test_sweep_sets_up_the_cache_and_hands_it_to_its_jobs(tmp_path, monkeypatch, jax_settings):
  """A launch sets the cache up in its own process (the vmap launcher trains there) and
  exports its directory to the jobs it starts (here every job is done: none starts)."""
  from dgjax import sweep
  from experiments import sweep as sweep_cli

  out, cache = tmp_path / "sweep", tmp_path / "cache"
  argv = ["--datasets", "Spirals", "--methods", "erm", "--n_hparams", "1", "--n_trials", "1"]
  argv += ["--steps", "1", "--output_dir", str(out), "--quiet"]
  for job in sweep.make_jobs(
    sweep.make_args_list(["Spirals"], ["erm"], n_trials=1, n_hparams=1, steps=1), out
  ):
    job.output_dir.mkdir(parents=True)
    (job.output_dir / "done").write_text("done\n")
  monkeypatch.setenv(cc.ENV_VAR, "off")
  assert sweep_cli.main(["launch", *argv, "--compilation_cache", str(cache)]) == 0
  assert jax.config.jax_compilation_cache_dir == str(cache)
  assert cc.os.environ[cc.ENV_VAR] == str(cache)
  jax.config.update("jax_compilation_cache_dir", None)
  assert sweep_cli.main(["launch", *argv, "--compilation_cache", "off"]) == 0
  assert jax.config.jax_compilation_cache_dir is None and cc.os.environ[cc.ENV_VAR] == "off"


def test_cpu_programs_are_written_and_read_back(tmp_path, jax_settings):
  """This jax caches CPU executables: a program compiled with the cache on is a file in the
  directory, and a fresh in-memory state reads it back (a hit) instead of compiling."""
  hits = []
  jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
  )
  cc.enable(tmp_path)  # every program, however quick its compile
  f = lambda x: jnp.sin(x) * 3.25 + 0.125  # noqa: E731
  x = jnp.arange(7.0)
  expected = jax.jit(f)(x)
  assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # the entry
  jax.clear_caches()
  jax_cache.reset_cache()
  before = len(hits)
  assert jnp.array_equal(jax.jit(f)(x), expected)
  assert len(hits) > before
