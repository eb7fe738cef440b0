"""Dataset registry: name -> environments, in/out splits and the model DomainBed trains on it.

    envs = datasets.load_environments("RotatedMNIST", data_dir="/data/mnist", trial_seed=0)
    splits_in, splits_out = datasets.make_splits(envs, holdout_fraction=0.2, trial_seed=0)
    model = datasets.get_dataset("RotatedMNIST").model("auto")

| name | environments | input | classes | model |
| --- | --- | --- | --- | --- |
| ``ColoredMNIST`` | ``+90%``, ``+80%``, ``-90%`` | 28x28x2 | 2 | DomainBed ``MNIST_CNN`` |
| ``ColoredFashionMNIST`` | the same construction on Fashion-MNIST | 28x28x2 | 2 | ``MNIST_CNN`` |
| ``RotatedMNIST`` | ``0`` ... ``75`` degrees | 28x28x1 | 10 | ``MNIST_CNN`` |
| ``Spirals`` | ``train0`` ... ``train15``, ``test`` | 10 | 2 (one logit) | MLP 256x3 |
| ``Debug28`` | ``0``, ``1``, ``2`` (16 random inputs each) | 28x28x3 | 2 | ``MNIST_CNN`` |

The image benchmarks (VLCS, PACS, OfficeHome, TerraIncognita, DomainNet, SVIRO, Debug224,
WILDSCamelyon, WILDSFMoW, the six Spawrious ones, ImageFolder) stream from disk through
:mod:`dgjax.image_task`; their facts are :data:`dgjax.data.image_folder.IMAGE_DATASETS`.

Colored Fashion-MNIST uses the partition of Ahuja et al. ("Invariant Risk Minimization
Games", ICML 2020): classes 0-4 (t-shirt, trouser, pullover, dress, coat) against 5-9
(sandal, shirt, sneaker, bag, ankle boot); the binary label is ``class < 5`` exactly as
Colored MNIST's ``digit < 5`` (which side is called 1 does not matter: the construction is
symmetric), then the same 25% label noise and per-environment colour flips.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dgjax.tasks import DomainBedTask, Split
from dgjax.data import (
  colored_mnist,
  env_split_seed,
  load_mnist,
  rotated_mnist,
  spirals,
  split_in_out,
)

Environments = Sequence[Any]  # each with .name, .x, .y


@dataclasses.dataclass(frozen=True)
class Dataset:
  """How to build one benchmark, and every fact about it the library reads.

  ``environments(data_dir, trial_seed, **options)`` returns the environments (each with
  ``name``, ``x``, ``y``); ``model(conv_impl)`` the flax classifier; ``default_test_env``
  the environment held out when none is given (negative: counted from the end); ``data``
  says what ``data_dir`` must hold; ``small_images`` is DomainBed's ``SMALL_IMAGES``: the
  common hparams' MNIST-sized defaults and ranges (lr 1e-3, batch size 64) rather than the
  large-image ones (lr 5e-5, batch size 32; :class:`dgjax.core.HParam`), so every dataset
  says which it is. ``env_names`` are the environments' names (records, tables, plots);
  ``hparams`` the dataset's own model and data hparams, added to every method's.
  """

  name: str
  description: str
  environments: Callable[..., Environments]
  model: Callable[[str], Any]
  default_test_env: int
  data: str
  small_images: bool
  env_names: tuple[str, ...] = ()
  options: tuple[str, ...] = ()
  steps: int = 5001  # DomainBed's N_STEPS
  checkpoint_freq: int = 100  # DomainBed's CHECKPOINT_FREQ
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the model's and data's
  make_task: Callable[..., Any] | None = None  # streaming datasets: config -> (task, envs)
  discover_env_names: Callable[[Any], tuple[str, ...]] | None = None  # env names read from data_dir

  def environment_names(self, data_dir=None) -> tuple[str, ...]:
    """The environments' names (read from ``data_dir`` for a user's own image tree)."""
    if self.env_names or self.discover_env_names is None:
      return self.env_names
    return tuple(self.discover_env_names(data_dir))

  def load(
    self, data_dir=None, trial_seed: int = 0, max_examples: int | None = None, **options
  ) -> Environments:
    """The environments (:func:`load_environments`); an option this dataset does not take
    raises naming the valid ones."""
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ValueError(
        f"dataset {self.name!r} takes no option(s) {', '.join(unknown)}; "
        f"valid: {', '.join(self.options) or 'none'}"
      )
    return self.environments(
      data_dir=data_dir, trial_seed=trial_seed, max_examples=max_examples, **options
    )

  @property
  def num_environments(self) -> int:
    return len(self.env_names)

  def task(self, config) -> tuple[Any, Environments]:
    """``(task, environments)`` of ``config`` (a :class:`dgjax.config.TrainConfig`) on this
    dataset, the one way a dataset's task is built: ``make_task(config)`` for a streaming
    dataset (:func:`dgjax.image_task.make_task`), else a :class:`dgjax.tasks.DomainBedTask`
    on DomainBed's in / out splits of the environments in memory."""
    if self.make_task is not None:
      return self.make_task(config)
    options = {"downsample": True} if config.downsample else {}
    envs = self.load(config.data_dir, config.trial_seed, config.max_examples, **options)
    splits_in, splits_out = make_splits(envs, config.holdout_fraction, config.trial_seed)
    from dgjax.backbones import in_memory_model  # --backbone other than auto

    model = in_memory_model(config, self.model(config.conv_impl), np.shape(envs[0].x)[1:])
    task = DomainBedTask(model, splits_in, splits_out, config.test_envs, config.eval_batch_size)
    return task, envs


def _pooled(data, max_examples):
  images, labels = data.images, data.labels
  if max_examples is not None:
    images, labels = images[:max_examples], labels[:max_examples]
  return images, labels


def _colored(tfds_name: str, name: str):
  def environments(data_dir=None, trial_seed=0, downsample=False, max_examples=None):
    data = load_mnist(data_dir, tfds_name=tfds_name, name=name)
    return colored_mnist(*_pooled(data, max_examples), seed=trial_seed, downsample=downsample)

  return environments


def _debug28(data_dir=None, trial_seed=0, max_examples=None):
  del data_dir
  from dgjax.data.debug import EXAMPLES, debug28_environments

  return debug28_environments(trial_seed, EXAMPLES if max_examples is None else max_examples)


def _rotated(data_dir=None, trial_seed=0, max_examples=None):
  data = load_mnist(data_dir)
  return rotated_mnist(*_pooled(data, max_examples), seed=trial_seed)


def _spirals(data_dir=None, trial_seed=0, max_examples=None):
  del data_dir
  if max_examples is None:
    return spirals(seed=trial_seed)
  return spirals(examples_per_env=max_examples, num_test=max_examples, seed=trial_seed)


def _cnn(num_classes):
  def model(conv_impl="auto"):
    from dgjax.models import mnist_cnn

    return mnist_cnn(num_classes=num_classes, conv_impl=conv_impl)

  return model


def _spirals_mlp(conv_impl="auto"):
  del conv_impl
  from dgjax.models import mlp

  return mlp(num_classes=1, hidden=(256, 256, 256))


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  if dataset.name in DATASETS:
    raise ValueError(f"dataset {dataset.name!r} is already registered")
  DATASETS[dataset.name] = dataset
  return dataset


def _image_dataset(name: str, description: str):
  """A DomainBed image dataset (:mod:`dgjax.data.image_folder`, :mod:`dgjax.image_task`)."""
  from dgjax.data.image_folder import IMAGE_DATASETS
  from dgjax.image_task import IMAGE_HPARAMS

  spec = IMAGE_DATASETS.get(name)

  def environments(data_dir=None, trial_seed=0, max_examples=None, data_source="folder"):
    del max_examples
    from dgjax.image_task import image_environments

    return image_environments(name, data_dir, data_source, trial_seed)

  def make_task(config):
    from dgjax.image_task import make_task as make

    return make(config)

  def discover(data_dir):
    from dgjax.image_task import image_environments

    return [e.name for e in image_environments(name, data_dir)]

  return Dataset(
    name,
    description,
    environments,
    model=lambda conv_impl="auto": None,
    default_test_env=0,
    data=spec.data_layout if spec else "<data_dir>/<environment>/<class>/<image> (your own images)",
    small_images=False,
    env_names=spec.env_names if spec else (),
    steps=spec.n_steps if spec else 5001,
    checkpoint_freq=spec.checkpoint_freq if spec else 300,
    hparams=IMAGE_HPARAMS,
    make_task=make_task,
    discover_env_names=None if spec else discover,
  )


# In DomainBed's ``datasets.DATASETS`` order, then dgjax's own: tables list datasets in this
# order (:func:`dgjax.domainbed_format.dataset_order`).
register(
  Dataset(
    "Debug28",
    "DomainBed's smoke test: 3 environments of 16 random N(0, 1) 28x28x3 inputs, random "
    "binary labels (dgjax.data.debug)",
    _debug28,
    _cnn(2),
    default_test_env=0,
    data="nothing (random inputs drawn from the trial seed)",
    small_images=True,
    env_names=("0", "1", "2"),
  )
)
register(
  _image_dataset(
    "Debug224",
    "DomainBed's smoke test: 3 environments of 16 random 224x224 images, random binary "
    "labels, through the image pipeline (dgjax.data.debug)",
  )
)
register(
  Dataset(
    "ColoredMNIST",
    "DomainBed's Colored MNIST: label digit<5 (25% noise), colour agrees with "
    "the label 90% / 80% / 10% (Arjovsky et al., 2019)",
    _colored("mnist", "MNIST"),
    _cnn(2),
    default_test_env=2,
    data="MNIST IDX files (default: TFDS 'mnist')",
    small_images=True,
    env_names=("+90%", "+80%", "-90%"),
    options=("downsample",),
  )
)
register(
  Dataset(
    "RotatedMNIST",
    "DomainBed's Rotated MNIST: digits rotated 0/15/30/45/60/75 degrees, 10 "
    "classes (Ghifary et al., 2015)",
    _rotated,
    _cnn(10),
    default_test_env=0,
    data="MNIST IDX files (default: TFDS 'mnist')",
    small_images=True,
    env_names=("0", "15", "30", "45", "60", "75"),
  )
)
register(
  _image_dataset("VLCS", "VLCS: Caltech101, LabelMe, SUN09, VOC2007; 5 classes (Fang et al., 2013)")
)
register(
  _image_dataset("PACS", "PACS: art painting, cartoon, photo, sketch; 7 classes (Li et al., 2017)")
)
register(
  _image_dataset(
    "OfficeHome",
    "Office-Home: art, clipart, product, real world; 65 classes (Venkateswara et al., 2017)",
  )
)
register(
  _image_dataset(
    "TerraIncognita",
    "Terra Incognita: camera-trap locations 100, 38, 43, 46; 10 classes (Beery et al., 2018)",
  )
)
register(
  _image_dataset(
    "DomainNet",
    "DomainNet: clipart, infograph, painting, quickdraw, real, "
    "sketch; 345 classes (Peng et al., 2019)",
  )
)
register(
  _image_dataset(
    "SVIRO",
    "SVIRO: rear-seat occupancy in 10 vehicles (aclass ... zoe), grayscale seat "
    "rectangles; 7 classes (Dias Da Cruz et al., 2020)",
  )
)
register(
  _image_dataset(
    "WILDSCamelyon",
    "Camelyon17-WILDS: tissue patches from 5 hospitals, tumor or not (Bandi et al., 2018; "
    "Koh et al., 2021)",
  )
)
register(
  _image_dataset(
    "WILDSFMoW",
    "FMoW-WILDS: satellite images from 6 regions, 62 land-use classes (Christie et al., "
    "2018; Koh et al., 2021)",
  )
)
for _kind, _what in (("O2O", "one-to-one"), ("M2M", "many-to-many")):
  for _level in ("easy", "medium", "hard"):
    register(
      _image_dataset(
        f"Spawrious{_kind}_{_level}",
        f"Spawrious {_what} {_level}: 4 dog breeds on backgrounds spuriously tied to them; "
        "environments Test, SC_group_1, SC_group_2 (Lynch et al., 2023)",
      )
    )
register(
  Dataset(
    "ColoredFashionMNIST",
    "Colored MNIST's construction on Fashion-MNIST, label class<5 (Ahuja et al., 2020)",
    _colored("fashion_mnist", "Fashion-MNIST"),
    _cnn(2),
    default_test_env=2,
    data="Fashion-MNIST IDX files (default: TFDS 'fashion_mnist')",
    small_images=True,
    env_names=("+90%", "+80%", "-90%"),
    options=("downsample",),
  )
)
register(
  Dataset(
    "Spirals",
    "Synthetic spirals with per-environment shortcut signatures (Parascandolo et al., "
    "2021); no download",
    _spirals,
    _spirals_mlp,
    default_test_env=-1,
    data="nothing (synthetic)",
    small_images=True,
    env_names=tuple(f"train{i}" for i in range(16)) + ("test",),
  )
)
register(
  _image_dataset(
    "ImageFolder",
    "your own images: <data_dir>/<environment>/<class>/<image>, "
    "environments and classes in sorted order",
  )
)


def get_dataset(name: str) -> Dataset:
  """The registered dataset ``name``; an unknown name raises listing the valid ones."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(
      f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}"
    ) from None


def load_environments(
  name: str, data_dir=None, trial_seed: int = 0, max_examples: int | None = None, **options
) -> Environments:
  """The environments of dataset ``name``.

  ``max_examples`` keeps only the first that many pooled images before the environments are
  built (MNIST variants), or is the number of examples per environment (Spirals): for quick
  runs and tests. ``options`` are dataset-specific (``downsample`` for the colored ones).
  """
  return get_dataset(name).load(data_dir, trial_seed, max_examples, **options)


def make_splits(
  envs: Environments,
  holdout_fraction: float = 0.2,
  trial_seed: int = 0,
  max_eval: int | None = None,
):
  """DomainBed's in/out split of every environment (seed ``env_split_seed(trial_seed, i)``).

  Returns ``(splits_in, splits_out)``, lists of :class:`dgjax.train.Split`; ``max_eval``
  truncates each out-split (faster evaluation in tests).
  """
  splits_in, splits_out = [], []
  for i, env in enumerate(envs):
    idx_in, idx_out = split_in_out(len(env.y), holdout_fraction, env_split_seed(trial_seed, i))
    if max_eval is not None:
      idx_out = idx_out[:max_eval]
    splits_in.append(Split(f"env{i}_in", np.asarray(env.x)[idx_in], np.asarray(env.y)[idx_in]))
    splits_out.append(Split(f"env{i}_out", np.asarray(env.x)[idx_out], np.asarray(env.y)[idx_out]))
  return splits_in, splits_out
