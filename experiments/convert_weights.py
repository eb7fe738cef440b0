r"""Convert pretrained backbone weights (torchvision / timm / DINOv2 / CLIP) to a dgjax
weights file, once.

    python -m experiments.convert_weights --arch resnet50 \
        --input resnet50-0676ba61.pth --output resnet50.msgpack
    python -m experiments.convert_weights --arch resnet50_augmix \
        --input model.safetensors --output resnet50_augmix.msgpack   # timm resnet50.ram_in1k
    python -m experiments.convert_weights --arch dinov2_vitb14 \
        --input dinov2_vitb14_pretrain.pth --output dinov2_vitb14.msgpack
    python -m experiments.convert_weights --arch clip_vitb16 \
        --input ViT-B-16.pt --output clip_vitb16.msgpack
    python -m experiments.convert_weights --arch resnet18 --where    # what to download

``.safetensors`` needs no torch; ``.pth`` needs ``pip install 'dgjax[convert]'``. Training
reads the output with ``--pretrained=<output>`` (see :mod:`dgjax.convert_weights`).
"""

from __future__ import annotations

import argparse
import sys

from dgjax import backbones, convert_weights


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Convert pretrained backbone weights for dgjax.")
  p.add_argument(
    "--arch",
    required=True,
    choices=sorted(backbones.BACKBONES),
    help="which backbone the weights are for (dgjax.backbones)",
  )
  p.add_argument("--input", help=".pth / .pt / .bin (torch) or .safetensors state dict")
  p.add_argument("--output", help="converted file to write (flax msgpack)")
  p.add_argument(
    "--include_head",
    action="store_true",
    help="also convert fc into the classifier head (DomainBed drops it)",
  )
  p.add_argument("--where", action="store_true", help="print where to download the weights")
  args = p.parse_args(argv)
  if args.where or not args.input:
    print(convert_weights.missing_weights_message(args.arch))
    return 0 if args.where else 2
  if not args.output:
    p.error("--output is required with --input")
  try:
    variables = convert_weights.convert_file(
      args.arch, args.input, args.output, include_head=args.include_head
    )
  except convert_weights.WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(v.size for v in _leaves(variables["params"]))
  print(f"wrote {args.output}: {args.arch} ({n:,} parameters) from {args.input}")
  return 0


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


if __name__ == "__main__":
  sys.exit(main())
