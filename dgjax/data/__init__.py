"""Data loading for dgjax: MNIST-format IDX/TFDS loaders and Colored MNIST.

References: Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021 (DomainBed); Arjovsky et al., "Invariant Risk Minimization", 2019.
"""

from dgjax.data.colored_mnist import (
  ENVIRONMENT_NAMES,
  ENVIRONMENTS,
  LABEL_NOISE,
  Environment,
  color_digits,
  colored_mnist,
  env_split_seed,
  environment_indices,
  environment_name,
  split_in_out,
)
from dgjax.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, read_idx
from dgjax.data.mnist import IDX_FILE_NAMES, MNISTData, load_mnist, load_mnist_idx

__all__ = [
  "DataError",
  "ENVIRONMENT_NAMES",
  "ENVIRONMENTS",
  "Environment",
  "IDX_FILE_NAMES",
  "IMAGES_MAGIC",
  "LABELS_MAGIC",
  "LABEL_NOISE",
  "MNISTData",
  "color_digits",
  "colored_mnist",
  "env_split_seed",
  "environment_indices",
  "environment_name",
  "load_mnist",
  "load_mnist_idx",
  "read_idx",
  "split_in_out",
]

# Rotated MNIST and Spirals (DomainBed / AND-mask paper benchmarks).
from dgjax.data.rotated_mnist import ANGLES, LabeledEnvironment, rotate_images, rotated_mnist  # noqa: E402
from dgjax.data.spirals import spiral_environment, spirals  # noqa: E402

__all__ += [
  "ANGLES",
  "LabeledEnvironment",
  "rotate_images",
  "rotated_mnist",
  "spiral_environment",
  "spirals",
]
