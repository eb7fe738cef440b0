"""DomainBed's image benchmarks as an engine task: ResNet on images streamed from disk.

Where each piece runs (see :mod:`dgjax.data.image_pipeline` and :mod:`dgjax.augment`): grain
worker processes decode the JPEGs and crop / flip them (host, uint8); a thread keeps the next
batches on the device (:class:`~dgjax.data.image_pipeline.DevicePrefetch`); inside the jitted
step the task's ``batch`` does ColorJitter, RandomGrayscale and the ImageNet normalisation
with the step's key. The stream is a function of (seed, step) alone, so a resumed run reads
the same batches as an uninterrupted one.

Evaluation: every environment's in and out split, resized to 224x224 and normalised, in
batches of ``eval_batch_size`` through one jitted, masked accuracy step; SWAD's validation loss
(:meth:`ImageTask.val_loss`) the same way through a masked cross-entropy sum.

The model is a backbone of :mod:`dgjax.backbones` with a new linear head: ``--backbone``, or
DomainBed's choice from the hparams (``resnet18``, ``resnet50_augmix``, ``vit``, ``dinov2``):
by default DomainBed's ``ResNet`` featurizer (ResNet-50 with timm's AugMix weights) with
``resnet_dropout``; ``DinoV2`` with ``vit_dropout`` / ``vit_attn_tune``. The weights are
converted by ``python -m experiments.convert_weights`` (``--pretrained FILE``; ``--pretrained
none`` trains from scratch). The ResNets' BatchNorm follows DomainBed's ``freeze_bn`` hparam. ``false`` (current
DomainBed's default): training normalises with batch statistics (pooled or per domain, as
the method's DomainBed forward: :attr:`dgjax.core.Method.forward_per_domain`) and moves the
running statistics, which the train state carries and evaluation uses. ``true`` (the DomainBed
of the paper, whose ``ResNet.train()`` always re-applied ``freeze_bn()``, so its published
tables): the running statistics of the weights file normalise in training and evaluation and
never change; the affine parameters still train.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dgjax import augment
from dgjax import backbones
from dgjax import sharding
from dgjax.core import HParam
from dgjax.data import image_check
from dgjax.data import image_folder
from dgjax.data import image_pipeline
from dgjax.task import TaskBase, arrays_fingerprint, files_fingerprint
from dgjax.tasks import make_accuracy_fn, make_loss_fn

#: The model and data hparams of DomainBed's image datasets (``hparams_registry.py``).
IMAGE_HPARAMS: dict[str, HParam] = {
  "resnet18": HParam(
    False, lambda r: False, "ResNet-18 instead of ResNet-50", kind="bool", structural=True
  ),
  "resnet_dropout": HParam(
    0.0,
    lambda r: float(r.choice([0.0, 0.1, 0.5])),
    "dropout on the ResNet features",
    kind="choice",
    choices=(0.0, 0.1, 0.5),
    structural=True,
  ),
  "data_augmentation": HParam(
    True,
    lambda r: True,
    "RandomResizedCrop, flip, ColorJitter, RandomGrayscale on the training images",
    kind="bool",
    structural=True,
  ),
  "freeze_bn": HParam(
    False,
    lambda r: False,
    "BatchNorm normalises with its running "
    "statistics and never updates them (true: the DomainBed of the paper's "
    "tables; false: current DomainBed's default)",
    kind="bool",
    structural=True,
  ),
  "resnet50_augmix": HParam(
    True,
    lambda r: True,
    "ResNet-50 with timm's AugMix weights (resnet50.ram_in1k; DomainBed's default) rather "
    "than torchvision's; resnet18=true overrides it here (dgjax.backbones)",
    kind="bool",
    structural=True,
  ),
  "vit": HParam(
    False, lambda r: False, "a ViT featurizer (with dinov2: DinoV2)", kind="bool", structural=True
  ),
  "dinov2": HParam(
    False,
    lambda r: False,
    "with vit: DINOv2 ViT-B/14 (DomainBed's DinoV2)",
    kind="bool",
    structural=True,
  ),
  "vit_attn_tune": HParam(
    False,
    lambda r: False,
    "ViTs: train only the attention parameters (and the head)",
    kind="bool",
    structural=True,
  ),
  "vit_dropout": HParam(
    0.0,
    lambda r: float(r.choice([0.0, 0.1, 0.5])),
    "dropout on the ViT features",
    kind="choice",
    choices=(0.0, 0.1, 0.5),
    structural=True,
  ),
}


def backbone_of(config) -> str:
  """The run's backbone: ``--backbone``, or DomainBed's choice from the resolved hparams
  (an image dataset's input is 224x224 to DomainBed whatever ``--image_size`` resizes it to)."""
  if config.backbone != "auto":
    return config.backbone
  return backbones.select(config.resolved_hparams)


def make_model(num_classes: int, hparams: Mapping[str, Any], backbone: str | None = None, **kw):
  """Backbone ``backbone`` (default: DomainBed's choice from ``hparams``) with a
  ``num_classes`` head; ``kw``: :func:`dgjax.backbones.featurizer`'s options."""
  return backbones.make_classifier(
    backbone or backbones.select(hparams), num_classes, hparams, **kw
  )


class ImageTask(TaskBase):
  """Training and evaluation on image file splits (see the module docstring).

  Args:
    model: a backbone classifier (:func:`dgjax.backbones.make_classifier`).
    pretrained: a converted weights file, or ``None`` for a fresh (torchvision-style) init.
    splits_in, splits_out: per environment, its in / out :class:`FileSplit`.
    test_envs: environments not trained on.
    batch_size: examples per training domain per step.
    seed: the run's seed (the stream's randomness derives from it).
    augment: DomainBed's ``data_augmentation``.
    train_transform: the dataset's host-side training transform
      (:data:`dgjax.data.image_pipeline.TRAIN_TRANSFORMS`).
  """

  streams = True
  has_val_loss = True

  def __init__(
    self,
    model,
    pretrained: str | None,
    splits_in: Sequence[Any],
    splits_out: Sequence[Any],
    test_envs: Sequence[int],
    batch_size: int,
    seed: int,
    augment: bool = True,
    eval_batch_size: int = 64,
    num_workers: int = 2,
    image_size: int = image_pipeline.IMAGE_SIZE,
    prefetch: int = 2,
    train_transform: str = "crop",
  ):
    n = len(splits_in)
    self.model = model
    self.splits_in, self.splits_out = list(splits_in), list(splits_out)
    self.test_envs = tuple(test_envs)
    self.train_envs = [e for e in range(n) if e not in self.test_envs]
    if not self.train_envs:
      raise ValueError("every environment is a test environment: nothing to train on")
    self.num_domains = len(self.train_envs)
    self.batch_size, self.seed, self.augment = batch_size, seed, augment
    self.train_transform = train_transform
    self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
    self.image_size, self.prefetch = image_size, prefetch
    self.pretrained = pretrained
    like = backbones.init_variables(model, jax.random.key(0), image_size)
    if pretrained is not None:
      from dgjax.convert_weights import load_pretrained

      like = load_pretrained(pretrained, like)
    self._pretrained_featurizer = like["params"]["featurizer"] if pretrained is not None else None
    # batch_stats: the weights file's running statistics (the train state carries them on)
    self.variables = {k: v for k, v in like.items() if k != "params"}
    self._min_train = min(len(self.splits_in[e].y) for e in self.train_envs)
    self._accuracy: dict[Any, Any] = {}
    self._loss: dict[Any, Any] = {}
    self._streams: list[Any] = []

  def init_params(self, key):
    params = backbones.init_variables(self.model, key, self.image_size)["params"]
    if (
      self._pretrained_featurizer is not None
    ):  # DomainBed: a new head on the pretrained featurizer
      params = {**params, "featurizer": self._pretrained_featurizer}
    return params

  def stream(self, start_step: int):
    """Device batches ``{"x": uint8[D, B, H, W, 3], "y": [D, B]}`` from ``start_step`` on."""
    host = image_pipeline.train_batches(
      [self.splits_in[e] for e in self.train_envs],
      jax.random.fold_in(jax.random.key(self.seed), 0x696D67),
      self.batch_size,
      augment=self.augment,
      transform=self.train_transform,
      start_step=start_step,
      size=self.image_size,
      num_workers=self.num_workers,
    )
    prefetch = image_pipeline.DevicePrefetch(host, size=self.prefetch)
    self._streams.append(prefetch)
    return prefetch

  def batch(self, data, key, batch_size):
    del batch_size
    if self.augment:
      x = augment.train_augment(key, data["x"])
    else:
      x = augment.eval_preprocess(data["x"])
    return {"x": x, "y": data["y"]}

  def epoch(self, step: int, batch_size: int) -> float:
    return step * batch_size / self._min_train

  def _accuracy_fn(self, predict, mesh=None):
    """:func:`dgjax.tasks.make_accuracy_fn`'s jitted chunk count ``correct(model_state, x, y,
    mask)``, on uint8 images (resized and normalised inside)."""
    if (predict, mesh) not in self._accuracy:
      on_images = lambda model_state, x: predict(model_state, augment.eval_preprocess(x))  # noqa: E731
      self._accuracy[predict, mesh] = make_accuracy_fn(on_images, mesh=mesh).correct
    return self._accuracy[predict, mesh]

  def _loss_fn(self, predict, mesh=None):
    """:func:`dgjax.tasks.make_loss_fn`'s jitted chunk sum ``loss_sum(model_state, x, y,
    mask)`` of the per-example cross-entropy, on uint8 images (resized and normalised inside)."""
    if (predict, mesh) not in self._loss:
      on_images = lambda model_state, x: predict(model_state, augment.eval_preprocess(x))  # noqa: E731
      self._loss[predict, mesh] = make_loss_fn(on_images, mesh=mesh).loss_sum
    return self._loss[predict, mesh]

  def _sum_over(self, fn, model_state, split, mesh=None) -> float:
    """``sum fn(model_state, x, y, mask)`` over ``split``'s evaluation batches."""
    if mesh is None:
      batches = image_pipeline.eval_batches(
        split, self.eval_batch_size, size=self.image_size, num_workers=self.num_workers
      )
    else:
      model_state = sharding.on_mesh(model_state, mesh)
      batches = self._process_eval_batches(split, mesh)
    return sum(float(fn(model_state, b["x"], b["y"], b["mask"])) for b in batches)

  def val_loss(self, model_state, predict, *, mesh=None) -> float:
    """The training-domain validation loss SWAD reads (as
    :meth:`dgjax.tasks.DomainBedTask.val_loss`, the reference's ``tr_outloss``): the mean
    cross-entropy of ``predict(model_state, x)`` on each training environment's out-split
    (evaluation preprocessing), averaged over the training environments."""
    empty = [e for e in self.train_envs if len(self.splits_out[e].y) == 0]
    if empty:
      raise ValueError(
        f"no training-domain validation data: the out-split(s) of "
        f"environment(s) {empty} hold no images (holdout_fraction must be > 0)"
      )
    loss_sum = self._loss_fn(predict, mesh)
    return float(
      np.mean(
        [
          self._sum_over(loss_sum, model_state, self.splits_out[e], mesh)
          / len(self.splits_out[e].y)
          for e in self.train_envs
        ]
      )
    )

  def accuracy(self, model_state, split, predict, mesh=None) -> float:
    """Accuracy of ``predict(model_state, x)`` on ``split`` in padded, masked batches of
    ``eval_batch_size`` through one jitted step.

    With a ``("domain", "data")`` ``mesh`` each batch is split over all its devices: the batch
    size is rounded up to a multiple of the device count (more masked padding, same count),
    the model state is replicated on the mesh, and each process decodes and feeds only its
    rows of every batch (:func:`dgjax.sharding.process_rows`): one process decodes whole
    batches, several decode their share of each (tested with 2 CPU processes on one machine,
    not on multi-host hardware)."""
    correct = self._accuracy_fn(predict, mesh)
    return self._sum_over(correct, model_state, split, mesh) / max(len(split.y), 1)

  def _process_eval_batches(self, split, mesh):
    """Global batches of ``eval_batch_size`` (rounded up to the device count) sharded over
    ``mesh``, this process feeding its rows of each (all rows with one process)."""
    size = sharding.round_up_to_devices(self.eval_batch_size, mesh)
    rows = sharding.process_rows(mesh, size)
    if len(rows) == size:  # one process: every row is ours
      local, valid = split, None
    else:  # global example b * size + r for each batch b and our row r
      n = len(split.y)
      index = (np.arange(-(-n // size))[:, None] * size + rows[None, :]).reshape(-1)
      valid = (index < n).reshape(-1, len(rows))
      take = np.minimum(index, max(n - 1, 0))  # padding rows: any path, masked out
      local = dataclasses.replace(split, x=np.asarray(split.x)[take], y=np.asarray(split.y)[take])
    for i, b in enumerate(
      image_pipeline.eval_batches(
        local, len(rows), size=self.image_size, num_workers=self.num_workers
      )
    ):
      if valid is not None:
        b = {**b, "mask": valid[i]}
      yield sharding.put_eval_batch(b, mesh, size)

  def evaluate(
    self, model_state, run: int, predict, *, step: int = 0, mesh=None
  ) -> dict[str, float]:
    """Accuracy on every environment's in and out split (:meth:`accuracy`; ``mesh``: sharded
    over its devices)."""
    del run, step
    if mesh is not None:  # replicated once for all the splits
      model_state = sharding.on_mesh(model_state, mesh)
    out = {}
    for e in range(len(self.splits_in)):
      out[f"env{e}_in_acc"] = self.accuracy(model_state, self.splits_in[e], predict, mesh)
      out[f"env{e}_out_acc"] = self.accuracy(model_state, self.splits_out[e], predict, mesh)
    return out

  def progress_numbers(self, record: Mapping[str, Any]) -> dict[str, float]:
    test = np.mean([record[f"env{e}_in_acc"] for e in self.test_envs])
    return {"loss": record["loss"], "test_acc": float(test)}

  def data_fingerprint(self) -> str:
    """A digest of every split's files (paths relative to their common folder, sizes,
    labels: :func:`dgjax.task.files_fingerprint`; the images are not read), or, for a TFDS
    copy, of its labels and record counts."""
    splits = self.splits_in + self.splits_out
    if all(isinstance(s.x, np.ndarray) and s.x.dtype.kind in "US" for s in splits):
      return files_fingerprint(
        (p for s in splits for p in s.x), (label for s in splits for label in s.y)
      )
    return arrays_fingerprint(
      (np.asarray(s.y) for s in splits), f"{sum(len(s.y) for s in splits)} labelled records"
    )

  def close(self):
    for s in self._streams:
      s.close()
    self._streams.clear()


def image_environments(name: str, data_dir, data_source: str = "folder", trial_seed: int = 0):
  """The environments of DomainBed image dataset ``name`` (or ``ImageFolder``: ``data_dir`` is
  the ``<env>/<class>/<image>`` root). ``data_source="tfds"``: from a TensorFlow Datasets copy
  prepared as array_record in ``data_dir`` (default ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``; DomainNet only, see :mod:`dgjax.data.tfds_images`).
  ``trial_seed``: the draws of Debug224's random images."""
  if data_source == "tfds":
    from dgjax.data.tfds_images import tfds_image_environments

    return tfds_image_environments(name, data_dir)
  if data_source != "folder":
    raise ValueError(f"unknown data_source {data_source!r}; valid: folder, tfds")
  if name == "ImageFolder":
    if data_dir is None:
      raise image_folder.DataError(
        "ImageFolder needs --data_dir: a folder of <environment>/<class>/<image>"
      )
    return image_folder.ImageFolderDomains(data_dir)
  return image_folder.image_dataset_environments(name, data_dir, trial_seed)


def make_task(config, envs=None):
  """``(task, envs)`` for ``config`` (a :class:`dgjax.train.TrainConfig` of an image dataset)."""
  from dgjax.convert_weights import missing_weights_message

  hp = config.resolved_hparams
  envs = (
    envs
    if envs is not None
    else image_environments(config.dataset, config.data_dir, config.data_source, config.trial_seed)
  )
  if config.data_source == "folder":  # every file an image, before any compiling
    image_check.check_image_files(
      path for env in envs if isinstance(env.x, np.ndarray) for path in env.x
    )
  spec = image_folder.IMAGE_DATASETS.get(config.dataset)  # None: ImageFolder
  splits_in, splits_out = image_folder.image_splits(
    envs, config.holdout_fraction, config.trial_seed
  )
  backbone = backbone_of(config)
  if config.pretrained is None:
    raise ValueError(missing_weights_message(backbone))
  pretrained = None if str(config.pretrained).lower() == "none" else config.pretrained
  model = make_model(
    len(envs[0].classes),
    hp,
    backbone,
    dtype=backbones.DTYPES[config.compute_dtype],
    remat=config.remat,
  )
  task = ImageTask(
    model,
    pretrained,
    splits_in,
    splits_out,
    config.test_envs,
    int(hp["batch_size"]),
    config.seed,
    augment=bool(hp["data_augmentation"]) and (spec is None or spec.augments),
    image_size=config.image_size,
    num_workers=config.data_workers,
    train_transform=spec.train_transform if spec is not None else "crop",
  )
  return task, envs
