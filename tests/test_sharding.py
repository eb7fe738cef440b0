"""The sharded step equals the single-device step; a 2-process jax.distributed run equals a
single-process run. Both in subprocesses (device counts are fixed when JAX starts)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgjax import results
from dgjax import train as train_lib
from dgjax.models import mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharding_worker  # noqa: E402

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


def _method_half(i):
  from dgjax import methods

  return sorted(methods.METHODS)[i::2]


@pytest.mark.parametrize("half", [0, 1])
def test_sharded_step_equals_single_device_for_every_method(half):
  """Every registered method, in two halves (one subprocess each, so two test workers share
  the work)."""
  names = _method_half(half)
  proc = subprocess.run(
    [sys.executable, str(WORKER), "equal", ",".join(names)],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  worst = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {k.split()[0] for k in worst} == set(names)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  port = free_port()
  out = tmp_path / "distributed"
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), "process", str(i), str(port), str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outputs):
    assert p.returncode == 0, e[-4000:]
  ins, outs = sharding_worker.toy_splits()
  cfg = train_lib.TrainConfig(
    method="sand", steps=6, checkpoint_freq=3, hparams={"batch_size": 8}, progress=False
  )
  single = train_lib.train(cfg, mlp(2, (8,)), ins, outs, checkpoint=False)
  distributed = results.read_jsonl(out / "results.jsonl")  # written by process 0 only
  assert [r["step"] for r in distributed] == [r["step"] for r in single] == [0, 3, 5]
  for a, b in zip(distributed, single):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for key in (f"env{e}_{s}_acc" for e in range(3) for s in ("in", "out")):
      assert abs(a[key] - b[key]) <= 1 / 24 + 1e-9, key
  assert (out / "done").exists()
