r"""Input pipeline throughput for the image benchmarks: images/s of decode + augment.

    python bench/input_pipeline.py                    # 300x300 JPEGs, 3 domains x 32
    python bench/input_pipeline.py --sizes 227,500x375 --workers 0,1,2 --steps 8

Writes synthetic JPEGs (smooth random colour fields + noise, quality 90, so their file size
and decode cost are those of photos of that size) into a temporary tree, then measures on
this machine:

* ``decode+resize``: one process, PIL decode + ``Resize((224, 224))`` (evaluation input);
* ``decode+crop+flip``: one process, decode + ``RandomResizedCrop(224, (0.7, 1))`` + flip;
* ``grain, W workers``: :func:`dgjax.data.image_pipeline.train_batches` steady state (after
  the first batch; the first batch's wait, worker start-up included, is reported apart);
* ``device colour aug``: :func:`dgjax.augment.train_augment` (ColorJitter, RandomGrayscale,
  normalise) on the default JAX device, jitted, on a ``[D, B, 224, 224, 3]`` batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_tree(root: Path, sizes, per_class: int, seed: int = 0):
  from PIL import Image

  rng = np.random.default_rng(seed)
  for env in ("e0", "e1", "e2"):
    for cls in ("c0", "c1"):
      d = root / env / cls
      d.mkdir(parents=True, exist_ok=True)
      for k in range(per_class):
        w, h = sizes[k % len(sizes)]
        coarse = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{k}.jpg", quality=90)


def rate(fn, n, min_s=1.0):
  fn(0)
  count, t0 = 0, time.perf_counter()
  while count < n or time.perf_counter() - t0 < min_s:
    fn(count)
    count += 1
  return count / (time.perf_counter() - t0)


def measure(
  sizes, per_class, domains, batch, workers, steps, read_threads=1, image_size=224, device_aug=True
):
  """Writes the synthetic tree (``sizes``: ``(w, h)`` pairs) and times each stage; returns
  ``(rows, mean_kb, n_domains)``, rows ``(stage, images/s, note)``: single-process decode,
  grain with each worker count in ``workers``, the on-device colour augmentation (unless not
  ``device_aug``)."""
  import jax
  from dgjax import augment
  from dgjax.data import image_folder as imf
  from dgjax.data import image_pipeline as pipe

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    write_tree(root, sizes, per_class)
    envs = imf.ImageFolderDomains(root)[:domains]
    paths = [str(x) for e in envs for x in e.x]
    mean_kb = np.mean([os.path.getsize(x) for x in paths]) / 1024
    n = 100 if steps > 2 else 2
    rows.append(
      (
        "decode+resize (1 process)",
        rate(lambda i: pipe.decode_eval(paths[i % len(paths)], image_size), n, min_s=n / 100),
        "",
      )
    )
    rows.append(
      (
        "decode+crop+flip (1 process)",
        rate(
          lambda i: pipe.decode_train(paths[i % len(paths)], pipe.example_rng((0,), i), image_size),
          n,
          min_s=n / 100,
        ),
        "",
      )
    )
    per_step = len(envs) * batch
    for w in workers:
      t0 = time.perf_counter()
      it = iter(
        pipe.train_batches(
          envs,
          jax.random.key(0),
          batch,
          size=image_size,
          num_workers=w,
          read_threads=read_threads,
        )
      )
      next(it)
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(steps):
        next(it)
      elapsed = time.perf_counter() - t0
      if hasattr(it, "close"):
        it.close()
      rows.append(
        (
          f"grain train_batches, {w} worker(s)",
          steps * per_step / elapsed,
          f"first batch {first:.1f} s; {1000 * elapsed / steps:.0f} ms/step",
        )
      )
    if not device_aug:
      return rows, mean_kb, len(envs)
    x = jax.device_put(
      np.random.default_rng(0).integers(
        0, 256, (len(envs), batch, image_size, image_size, 3), dtype=np.uint8
      )
    )
    f = jax.jit(augment.train_augment)
    f(jax.random.key(0), x).block_until_ready()
    t0 = time.perf_counter()
    reps = 3
    for i in range(reps):
      f(jax.random.key(i), x).block_until_ready()
    rows.append(
      (
        f"device colour aug ({jax.devices()[0].platform})",
        reps * per_step / (time.perf_counter() - t0),
        "",
      )
    )
  return rows, mean_kb, len(envs)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--sizes", default="300", help="comma list of WxH or S (square) image sizes")
  p.add_argument("--per_class", type=int, default=40)
  p.add_argument("--domains", type=int, default=3)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", default="0,1,2", help="comma list of grain worker counts")
  p.add_argument("--steps", type=int, default=6, help="timed steps per grain configuration")
  p.add_argument("--read_threads", type=int, default=1)
  args = p.parse_args(argv)

  sizes = []
  for s in args.sizes.split(","):
    w, _, h = s.partition("x")
    sizes.append((int(w), int(h or w)))
  workers = [int(v) for v in args.workers.split(",")]
  rows, mean_kb, n_domains = measure(
    sizes, args.per_class, args.domains, args.batch, workers, args.steps, args.read_threads
  )
  print(
    f"images {', '.join(f'{w}x{h}' for w, h in sizes)} JPEG (mean {mean_kb:.0f} KiB), "
    f"{n_domains} domains x {args.batch}, {os.cpu_count()} CPU cores"
  )
  print(f"| {'stage':<38} | {'images/s':>9} | notes")
  print(f"| {'-' * 38} | {'-' * 9} | -----")
  for name, r, note in rows:
    print(f"| {name:<38} | {r:9.1f} | {note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
