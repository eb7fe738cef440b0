r"""Run a paper's own IRM-style Colored MNIST script on CPU with local digits (the reference run).

    python bench/reference_cmnist_script.py --script /path/to/HessianAlignment/cmnist/cmnist_HGP.py \
        --digits $DGJAX_DATA_DIR/mnist-first10k --python /path/to/torch-env/bin/python \
        --algorithm irm --n_restarts 3

The scripts (the Hessian paper's ``cmnist_HGP.py`` / ``cmnist_Hutchinson.py`` in
huawei-noah/Federated-Learning ``HessianAlignment/``, Fishr's ``train_coloredmnist.py``) are
not part of dgjax: fetch them yourself. This tool writes a patched copy beside a stand-in for
``torchvision.datasets.MNIST`` into a temporary directory and runs it with ``--python`` (an
environment with torch and backpack-for-pytorch). The patches change where the data comes
from and where the work runs, not the method:

* ``.cuda()`` removed (CPU), one torch thread;
* ``datasets.MNIST`` reads the IDX files in ``--digits``; the scripts' 50,000 / 10,000 split
  becomes the same 5/6 proportion of the digits there (``dgjax.data.irm_cmnist``'s rule);
* BackPACK's ``BatchGrad`` leaves ``grad_batch`` unset under torch 2.13, so
  ``compute_grads_variance`` gets the same per-example head gradients written out
  (``(sigmoid(logit) - y) / n`` times the features, and for the bias);
* the Hutchinson script's ``eval_hessian`` (a full head Hessian for one log column,
  ``hessain_dists``, never used in training) returns zeros.

Two options for comparing one restart step by step (``bench/irm_same_start.py``):
``--dump FILE.npz`` writes restart 0's four environments and the MLP's initial weights before
training, and ``--print_every N`` prints the script's log line every ``N`` steps (it prints
every 100).

Compare its final lines with ``python -m experiments.reproduce irm_cmnist`` on the same digits.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MNIST_STANDIN = '''
import gzip, os, numpy as np, torch
ROOT = os.environ["REFERENCE_DIGITS"]
def _read(name, offset):
  path = os.path.join(ROOT, name)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)
def _find(stem):
  for name in (stem + ".gz", stem):
    if os.path.exists(os.path.join(ROOT, name)):
      return name
  raise FileNotFoundError(os.path.join(ROOT, stem))
class MNIST:
  def __init__(self, *args, **kwargs):
    images = _read(_find("train-images-idx3-ubyte"), 16).reshape(-1, 28, 28).copy()
    self.data = torch.from_numpy(images)
    self.targets = torch.from_numpy(_read(_find("train-labels-idx1-ubyte"), 8).astype(np.int64))
'''

PER_EXAMPLE_GRADS = (
  "        logits = classifier(features)\n"
  "        resid = (torch.sigmoid(logits) - labels) / labels.size(0)\n"
  "        dict_grads = OrderedDict([('weight', resid * features), ('bias', resid)])\n"
)


DUMP = (
  "    mlp = MLP()\n"
  "    if restart == 0 and os.environ.get('REFERENCE_DUMP'):\n"
  "        _d = {f'env{i}_x': e['images'].numpy() for i, e in enumerate(envs)}\n"
  "        _d.update({f'env{i}_y': e['labels'].numpy() for i, e in enumerate(envs)})\n"
  "        _d.update({'p_' + k: v.detach().numpy() for k, v in mlp.state_dict().items()})\n"
  "        np.savez(os.environ['REFERENCE_DUMP'], **_d)\n"
)


def patch(source: str, n_train: int, print_every: int = 100) -> str:
  """The script's text with the patches of the module docstring."""
  out = source.replace(".cuda()", "")
  out = out.replace("[:50000]", f"[:{n_train}]").replace("[50000:]", f"[{n_train}:]")
  out = re.sub(
    r"^import random$",
    "import random\nimport torch as _t\n_t.set_num_threads(1)",
    out,
    count=1,
    flags=re.M,
  )
  start = out.index("        logits = classifier(features)\n        loss = bce_extended(")
  end = out.index("        dict_grads_variance = {}", start)
  out = out[:start] + PER_EXAMPLE_GRADS + out[end:]
  out = out.replace(
    "    def eval_hessian(loss_grad, model):\n",
    "    def eval_hessian(loss_grad, model):\n        return np.zeros((1, 1))\n",
  )
  out = out.replace("    mlp = MLP()\n", DUMP, 1)
  out = out.replace(
    "        if step % 100 == 0:\n",
    f"        if step % {print_every} == 0 or step == flags.steps - 1:\n",
    1,
  )
  return "import os\n" + out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--script", required=True, help="the paper's script (fetched separately)")
  p.add_argument("--digits", required=True, help="MNIST IDX files (training digits)")
  p.add_argument("--python", default=sys.executable, help="an interpreter with torch, backpack")
  p.add_argument("--n_digits", type=int, default=10000, help="digits in --digits")
  p.add_argument("--dump", help="write restart 0's environments and initial weights here (.npz)")
  p.add_argument("--print_every", type=int, default=100, help="log every this many steps")
  args, script_args = p.parse_known_args(argv)
  n_train = int(round(args.n_digits * 5 / 6))
  with tempfile.TemporaryDirectory() as tmp:
    shim = Path(tmp) / "torchvision"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    (shim / "datasets.py").write_text(MNIST_STANDIN)
    script = Path(tmp) / Path(args.script).name
    script.write_text(patch(Path(args.script).read_text(), n_train, args.print_every))
    env = {**os.environ, "PYTHONPATH": tmp, "REFERENCE_DIGITS": str(Path(args.digits).resolve())}
    if args.dump:
      env["REFERENCE_DUMP"] = str(Path(args.dump).resolve())
    return subprocess.call([args.python, str(script), *script_args], env=env)


if __name__ == "__main__":
  sys.exit(main())
