"""Run directories you can trust: one writer per run (the lock taken before anything is read or
deleted), resume without duplicated or lost records and only of the same run, checkpoints
verified on restore with fallback, one line for a full disk or Ctrl-C saying what was kept,
bad input (a file that is no image) refused before any work, progress that reads well in a
log."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from dgjax import results
from dgjax import runs
from dgjax import train as train_lib
from dgjax.checkpoints import CheckpointError
from dgjax.models import mlp
from dgjax.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def cli(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "experiments.train", *args],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def splits():
  rng = np.random.default_rng(0)
  ins, outs = [], []
  for e in range(3):
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * e > 0).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[:48], y[:48]))
    outs.append(train_lib.Split(f"env{e}_out", x[48:], y[48:]))
  return ins, outs


def config(**kw):
  return train_lib.TrainConfig(
    **{
      "method": "erm",
      "steps": 7,
      "checkpoint_freq": 2,
      "hparams": {"batch_size": 8},
      "progress": False,
      **kw,
    }
  )


def test_a_second_process_cannot_write_a_running_run(tmp_path):
  out = tmp_path / "run"
  first = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--dataset=Spirals",
      "--max_examples=32",
      "--steps=1000000",
      "--checkpoint_freq=1000000",
      f"--output_dir={out}",
      "--noprogress",
      '--hparams={"batch_size": 4}',
    ],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 240
    while not (out / "results.jsonl").exists():  # the first run is training (and holds its lock)
      assert first.poll() is None, first.communicate()[1][-2000:]
      assert time.time() < deadline, "the first run never took its lock"
      time.sleep(0.2)
    # --overwrite, the most dangerous; all three ways in are refused by
    # test_overwrite_while_another_process_holds_the_run_touches_nothing
    second = cli(
      "--dataset=Spirals",
      "--max_examples=32",
      "--steps=3",
      f"--output_dir={out}",
      "--noprogress",
      "--overwrite",
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"being written by another running process (pid {first.pid} " in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the first run was not disturbed ...
    assert (out / "results.jsonl").exists() and results.is_locked(out)  # ... nor its files
  finally:
    first.kill()
    first.wait()
  # the lock dies with its process: the directory can be resumed now
  assert not results.is_locked(out)


def test_resume_without_a_checkpoint_starts_over_without_duplicates(tmp_path):
  ins, outs = splits()
  cfg = config()
  # a run killed right after its step-0 record, before any checkpoint was committed
  results.append_jsonl(tmp_path / "results.jsonl", {"step": 0, "stale": True})
  records = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)
  on_disk = results.read_jsonl(tmp_path / "results.jsonl")
  assert [r["step"] for r in on_disk] == [r["step"] for r in records] == [0, 2, 4, 6]
  assert not any(r.get("stale") for r in on_disk)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  ins, outs = splits()
  model = mlp(2, (8,))
  reference = train_lib.train(config(), model, ins, outs, checkpoint=False)
  cut = config(steps=5)  # evaluations (and checkpoints) at steps 0, 2, 4
  train_lib.train(cut, model, ins, outs, output_dir=tmp_path)
  (tmp_path / "done").unlink()
  newest = tmp_path / "checkpoints" / "4"
  for f in newest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  resumed = train_lib.train(config(), model, ins, outs, output_dir=tmp_path, resume=True)
  err = capsys.readouterr().err
  assert "unreadable" in err and "resuming from the checkpoint of step 2" in err
  on_disk = results.read_jsonl(tmp_path / "results.jsonl")
  assert [r["step"] for r in on_disk] == [0, 2, 4, 6]  # step 4 recomputed, not duplicated
  for a, b in zip(on_disk, reference):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
  assert [r["step"] for r in resumed] == [0, 2, 4, 6]


def test_only_unreadable_checkpoints_is_a_one_line_error(tmp_path):
  ins, outs = splits()
  train_lib.train(config(steps=3), mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  for f in (tmp_path / "checkpoints").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="cannot restore any checkpoint"):
    train_lib.train(config(steps=3), mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": -3}, "steps must be an integer >= 1"),
    ({"checkpoint_freq": 0}, "checkpoint_freq must be an integer >= 1"),
    ({"max_examples": 0}, "max_examples must be >= 1"),
    ({"hparams": {"batch_size": 0}}, "hparam 'batch_size' must be >= 1"),
    ({"method": "sand", "hparams": {"tau": "high"}}, "hparam 'tau' must be a number, got 'high'"),
    ({"method": "sand", "hparams": {"tau": 1.5}}, "hparam 'tau' must be <= 1.0"),
    ({"hparams": {"lr": -1}}, "hparam 'lr' must be > 0"),
    (
      {"method": "hgp", "hparams": {"detach_target": "yes"}},
      "hparam 'detach_target' must be true or false",
    ),
    (
      {"method": "hgp", "preset": "nope"},
      "has no preset 'nope'; its presets: irm_cmnist, irm_schedule",
    ),
  ],
)
def test_bad_settings_are_named_errors(fields, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    runs.make_config("Spirals", **fields)


def test_cli_refuses_bad_input_before_loading_data(tmp_path):
  """Errors come before the data is read: the data directory here does not exist, so any
  error about it would mean the checks ran too late."""
  missing = str(tmp_path / "no-such-data")
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  readonly.chmod(0o500)
  cases = [
    (["--steps=0"], "steps must be an integer >= 1"),
    (['--hparams={"batch_size": 0}'], "batch_size"),
    (["--method=sand", '--hparams={"tau": "high"}'], "hparam 'tau' must be a number"),
    ([f"--output_dir={readonly / 'run'}"], "cannot write to the output directory"),
  ]
  if os.geteuid() == 0:  # root writes anywhere: the read-only case cannot be made
    cases = cases[:-1]
  for extra, message in cases:
    proc = cli(
      "--dataset=ColoredMNIST", f"--data_dir={missing}", f"--output_dir={tmp_path / 'out'}", *extra
    )
    assert proc.returncode == 2, (extra, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
    assert not (tmp_path / "out" / "checkpoints").exists()
  assert not (tmp_path / "out" / "done").exists()


def test_progress_writes_one_line_per_evaluation_to_a_log():
  stream = io.StringIO()
  p = Progress("sand", 101, stream=stream)
  for step in range(101):
    p.advance()
    if step % 50 == 0 or step == 100:
      p.evaluated(step, {"loss": 0.5, "test_acc": 0.25}, 0.01)
  p.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue() and len(lines) == 3
  assert (
    lines[0].startswith("sand step 0/101")
    and "loss 0.5" in lines[0]
    and "test_acc 0.25" in lines[0]
  )


# ------------------------------------------------------------ runs that cannot be corrupted
HOLD_LOCK = (
  "import sys, time\nfrom dgjax import results\nresults.RunLock(sys.argv[1]).acquire()\n"
  "print('held', flush=True)\ntime.sleep(120)\n"
)


def strip_timing(records):
  return [{k: v for k, v in r.items() if k not in ("step_time", "eval_time")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted():
  """config()'s records (evaluations at steps 0, 2, 4, 6) without any interruption."""
  ins, outs = splits()
  return json.loads(
    json.dumps(strip_timing(train_lib.train(config(), mlp(2, (8,)), ins, outs, checkpoint=False)))
  )


def resume_equals_uninterrupted(out, uninterrupted):
  ins, outs = splits()
  resumed = train_lib.train(config(), mlp(2, (8,)), ins, outs, output_dir=out, resume=True)
  assert strip_timing(results.read_jsonl(out / "results.jsonl")) == uninterrupted  # bitwise
  assert [r["step"] for r in resumed] == [0, 2, 4, 6] and (out / "done").exists()


def test_resume_with_other_data_is_refused_in_one_line_before_loading_it(tmp_path):
  out = tmp_path / "run"
  cfg = runs.make_config(
    "Spirals",
    max_examples=16,
    steps=2,
    checkpoint_freq=1,
    output_dir=str(out),
    progress=False,
    hparams={"batch_size": 4},
  )
  runs.run(cfg)
  kept = (out / "results.jsonl").read_bytes()
  fashion = runs.make_config(
    "ColoredFashionMNIST", steps=2, checkpoint_freq=1, output_dir=str(out), progress=False
  )  # its data is not here
  for other, message in [
    (dataclasses.replace(cfg, max_examples=32), "(max_examples: checkpoint 16 vs now 32)"),
    (fashion, "dataset: checkpoint 'Spirals' vs now 'ColoredFashionMNIST'"),
  ]:
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
      runs.run(other, resume=True)
    assert "\n" not in str(err.value)
  proc = cli(
    "--dataset=Spirals",
    "--max_examples=32",
    "--steps=2",
    "--checkpoint_freq=1",
    f"--output_dir={out}",
    "--resume",
    "--noprogress",
    '--hparams={"batch_size": 4}',
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: the checkpoint in ")
  assert "max_examples: checkpoint 16 vs now 32" in proc.stderr
  assert (out / "results.jsonl").read_bytes() == kept and (out / "done").exists()


def test_resume_reads_the_data_not_where_it_lies(tmp_path, uninterrupted):
  """The checkpoint's identity holds a digest of the data (:meth:`dgjax.task.Task.
  data_fingerprint`): the same data (here a copy of the arrays) resumes, changed data (one
  label) is refused in one line before any record is touched."""
  out = tmp_path / "run"
  ins, outs = splits()
  train_lib.train(config(), mlp(2, (8,)), ins, outs, output_dir=out)
  kept = (out / "results.jsonl").read_bytes()
  meta = json.loads((out / "checkpoint_meta.json").read_text())
  assert meta["data"].startswith("192 examples in 3 environments, sha256 ")
  flipped = [train_lib.Split(s.name, s.x, s.y.copy()) for s in outs]
  flipped[1].y[0] = 1 - flipped[1].y[0]
  with pytest.raises(CheckpointError, match=r"\(data: checkpoint .192 examples.*' vs now") as err:
    train_lib.train(config(), mlp(2, (8,)), ins, flipped, output_dir=out, resume=True)
  assert "\n" not in str(err.value) and (out / "results.jsonl").read_bytes() == kept
  copies = [[train_lib.Split(s.name, s.x.copy(), s.y.copy()) for s in ss] for ss in (ins, outs)]
  resumed = train_lib.train(config(), mlp(2, (8,)), *copies, output_dir=out, resume=True)
  assert strip_timing(resumed) == uninterrupted  # resumed at the end: nothing trained again


def write_idx(folder, images, labels):
  """MNIST's two training IDX files (uint8 images, labels) in ``folder``."""
  folder.mkdir(parents=True)
  header = lambda magic, shape: (
    bytes([0, 0, 8, magic]) + b"".join(int(n).to_bytes(4, "big") for n in shape)
  )
  (folder / "train-images-idx3-ubyte").write_bytes(header(3, images.shape) + images.tobytes())
  (folder / "train-labels-idx1-ubyte").write_bytes(header(1, labels.shape) + labels.tobytes())


def test_data_fingerprint_follows_the_content_of_data_dir(tmp_path):
  """A data directory moved (the same files elsewhere) gives the same fingerprint, so its run
  resumes; other content (one digit changed, one image file resized or added) another."""
  from dgjax import datasets
  from dgjax.data.image_folder import FileSplit
  from dgjax.image_task import ImageTask

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 60).astype(np.uint8)
  write_idx(tmp_path / "a", images, labels)
  (tmp_path / "a").rename(tmp_path / "moved")
  changed = images.copy()
  changed[7, 3, 3] ^= 1
  write_idx(tmp_path / "b", changed, labels)
  ds = datasets.get_dataset("ColoredMNIST")

  def fingerprint(folder):
    cfg = runs.make_config(ds, data_dir=str(tmp_path / folder), max_examples=60, progress=False)
    return ds.task(cfg)[0].data_fingerprint()

  moved = fingerprint("moved")
  assert moved.startswith("60 examples in 3 environments, sha256 ")
  assert moved != fingerprint("b")
  write_idx(tmp_path / "c", images, labels)
  assert fingerprint("c") == moved
  # image trees (ImageTask): paths relative to their common folder, sizes, labels
  for root in ("t1", "t2"):
    for env, cls, name in (("e0", "c0", "x.jpg"), ("e1", "c1", "y.jpg")):
      (tmp_path / root / env / cls).mkdir(parents=True)
      (tmp_path / root / env / cls / name).write_bytes(b"\xff\xd8" + bytes(10))

  def tree(root, labels=(0, 1)):  # an ImageTask's splits, one file each
    paths = [str(tmp_path / root / p) for p in ("e0/c0/x.jpg", "e1/c1/y.jpg")]
    split = lambda i, kind: FileSplit(
      f"env{i}_{kind}", np.array(paths[i : i + 1]), labels[i : i + 1]
    )
    task = types.SimpleNamespace(
      splits_in=[split(0, "in"), split(1, "in")], splits_out=[split(0, "out"), split(1, "out")]
    )
    return ImageTask.data_fingerprint(task)

  assert tree("t1") == tree("t2") and tree("t1").startswith("4 files, sha256 ")
  assert tree("t1") != tree("t1", labels=(1, 1))
  (tmp_path / "t2/e1/c1/y.jpg").write_bytes(b"\xff\xd8" + bytes(11))
  assert tree("t1") != tree("t2")


def test_overwrite_while_another_process_holds_the_run_touches_nothing(tmp_path):
  out = tmp_path / "run"
  (out / "checkpoints" / "4").mkdir(parents=True)
  (out / "checkpoints" / "4" / "data").write_bytes(b"state")
  (out / "results.jsonl").write_text('{"step": 0}\n')
  before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(out)],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    for how in ({"overwrite": True}, {"resume": True}, {}):
      with pytest.raises(
        results.RunLockedError,
        match=rf"another running process \(pid "
        rf"{holder.pid} on .*-c",
      ):
        runs.open_output_dir(config(output_dir=str(out)), **how)
    after = sorted(
      (p.relative_to(out), p.read_bytes())
      for p in out.rglob("*")
      if p.is_file()
      if not p.name.startswith(".lock")
    )
    assert after == before
  finally:
    holder.kill()
    holder.wait()
  with runs.open_output_dir(config(output_dir=str(out)), overwrite=True):  # now it may
    assert not (out / "checkpoints").exists() and not (out / "results.jsonl").exists()
  assert not results.is_locked(out)


def test_flipped_bits_in_the_newest_checkpoint_are_set_aside(tmp_path, capsys, uninterrupted):
  ins, outs = splits()
  train_lib.train(config(steps=5), mlp(2, (8,)), ins, outs, output_dir=tmp_path)  # 0, 2, 4
  (tmp_path / "done").unlink()
  newest = tmp_path / "checkpoints" / "4"
  largest = max(
    (p for p in newest.rglob("*") if p.is_file() and p.name != "dgjax_sha256.json"),
    key=lambda p: p.stat().st_size,
  )
  data = bytearray(largest.read_bytes())
  for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
    data[i] ^= 0x10  # three flipped bits
  largest.write_bytes(bytes(data))
  capsys.readouterr()
  resume_equals_uninterrupted(tmp_path, uninterrupted)
  warning = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning")]
  assert len(warning) == 1 and "step 4: damaged, checksum mismatch in " in warning[0]
  assert "resuming from the checkpoint of step 2" in warning[0]
  assert len(list((tmp_path / "checkpoints_unreadable").iterdir())) == 1


def _fail_on_call(n, error):
  calls = [0]

  def fail(real):
    def wrapped(*args, **kw):
      calls[0] += 1
      if calls[0] == n:
        raise error
      return real(*args, **kw)

    return wrapped

  return fail


@pytest.mark.parametrize("where", ["records", "checkpoint"])
def test_a_full_disk_is_one_line_saying_what_was_kept(tmp_path, monkeypatch, uninterrupted, where):
  import errno
  from dgjax import checkpoints

  ins, outs = splits()
  full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
  if where == "records":  # the third record cannot be written
    monkeypatch.setattr(results, "append_jsonl", _fail_on_call(3, full)(results.append_jsonl))
    kept = "keeps 2 records (last step 2) and the checkpoint of step 2"
  else:  # the second checkpoint's manifest cannot be written
    monkeypatch.setattr(
      checkpoints, "write_manifest", _fail_on_call(2, full)(checkpoints.write_manifest)
    )
    kept = "keeps 2 records (last step 2) and the checkpoint of step 0"
  with pytest.raises(train_lib.DiskFullError) as err:
    train_lib.train(config(), mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  message = str(err.value)
  assert "\n" not in message and err.value.errno == errno.ENOSPC
  assert message.startswith("the disk is full (No space left on device: ") and kept in message
  monkeypatch.undo()
  assert not results.is_locked(tmp_path)
  if where == "checkpoint":  # the unfinished checkpoint is set aside (no manifest)
    resume_equals_uninterrupted(tmp_path, uninterrupted)
  # Orbax and TensorStore wrap the OSError, or only say it
  assert train_lib.is_disk_full(ValueError("writing: [OS error: No space left on device]"))
  assert not train_lib.is_disk_full(ValueError("shape mismatch"))


def test_ctrl_c_says_what_was_kept_and_resume_is_exact(tmp_path, monkeypatch, uninterrupted):
  ins, outs = splits()
  monkeypatch.setattr(Progress, "advance", _fail_on_call(4, KeyboardInterrupt())(Progress.advance))
  with pytest.raises(train_lib.RunInterrupted) as err:  # during step 3
    train_lib.train(config(), mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  assert isinstance(err.value, KeyboardInterrupt)
  assert str(err.value) == (
    f"interrupted (Ctrl-C); {tmp_path} keeps 2 records (last step 2) "
    "and the checkpoint of step 2; --resume continues from the checkpoint"
  )
  monkeypatch.undo()
  resume_equals_uninterrupted(tmp_path, uninterrupted)


def test_cli_ctrl_c_and_full_disk_end_in_one_line(tmp_path):
  import signal

  out = tmp_path / "run"
  flags = [
    "--dataset=Spirals",
    "--max_examples=32",
    "--checkpoint_freq=5",
    "--noprogress",
    '--hparams={"batch_size": 4}',
  ]
  proc = subprocess.Popen(
    [sys.executable, "-m", "experiments.train", *flags, "--steps=1000000", f"--output_dir={out}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # Ctrl-C as in a terminal: a suite started in the background (a shell's `cmd &` without job
    # control) hands its children SIGINT ignored, and Python then keeps it ignored
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  deadline = time.time() + 240
  while not (
    (out / "results.jsonl").exists() and len((out / "results.jsonl").read_text().splitlines()) >= 2
  ):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  try:
    _, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:  # the Ctrl-C was lost: stop the run, fail
    proc.kill()
    raise
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"interrupted (Ctrl-C); {out} keeps ") and " records (last step " in last
  # a full disk: the second record cannot be written
  patch = (
    "import errno, sys\nfrom dgjax import results\nreal, n = results.append_jsonl, [0]\n"
    "def full(*a, **k):\n  n[0] += 1\n  if n[0] == 2:\n"
    "    raise OSError(errno.ENOSPC, 'No space left on device', str(a[0]))\n"
    "  return real(*a, **k)\nresults.append_jsonl = full\n"
    "from absl import app\nfrom experiments import train\napp.run(train.main)\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", patch, *flags, "--steps=12", f"--output_dir={tmp_path / 'full'}"],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert (
    done.stderr.strip()
    .splitlines()[-1]
    .startswith("error: the disk is full (No space left on device: ")
  )
  assert "keeps 1 records (last step 0) and the checkpoint of step 0" in done.stderr


def test_cli_names_a_file_that_is_no_image_before_training(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  tree = tmp_path / "tree"
  for env in ("a", "b"):
    for cls in ("cat", "dog"):
      (tree / env / cls).mkdir(parents=True)
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tree / env / cls / "0.jpg"
      )
  (tree / "b" / "dog" / "1.jpg").write_text("<html>404 Not Found</html>")
  proc = cli(
    "--dataset=ImageFolder",
    f"--data_dir={tree}",
    "--pretrained=none",
    f"--output_dir={tmp_path / 'out'}",
    "--test_envs=1",
    "--image_size=16",
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
    f"error: 1 of 5 image files are not images (their first bytes match no image format): "
    f"{tree / 'b' / 'dog' / '1.jpg'} (starts b'<html>404 No'); remove or replace them"
  ]
  assert not (tmp_path / "out" / "results.jsonl").exists()
