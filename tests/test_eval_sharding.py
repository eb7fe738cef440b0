"""Evaluation sharded over a device mesh equals single-device evaluation (DomainBedTask's
accuracies and SWAD validation loss, ImageTask's accuracies), and its device batches really
are split over all the mesh's devices. In a subprocess with 8 CPU devices (device counts are
fixed when JAX starts); the checks are in ``sharding_worker.eval_equal``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


def test_sharded_evaluation_equals_single_device(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(WORKER), "eval", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(out) == {"domainbed 2x4", "domainbed 1x3", "image"}
  for label in ("domainbed 2x4", "domainbed 1x3"):
    sharded, single = out[label]["val_loss"]
    np.testing.assert_allclose(sharded, single, rtol=1e-6)
  assert len(out["image"]["acc"]) == 4
