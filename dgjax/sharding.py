"""Mesh sharding of the train step: data parallel over the batch, optionally over domains.

The step is one ``jax.jit`` program; sharding only annotates where its arrays live and XLA's
SPMD partitioner inserts the collectives. Per-domain statistics (mask sign agreement and
variance across domains, Hessian-alignment means, ...) are computed by the same program as
on one device, so they are those of the unsharded step up to float summation order.

Mesh axes (``jax.make_mesh``):

- ``"domain"``: the leading domain axis ``D`` of a minibatch ``[D, B, ...]``;
- ``"data"``: the per-domain batch axis ``B``.

Parameters, optimizer state and the (small) training set are replicated; each device
gathers its own rows of every minibatch from its replica. Multi-host runs
(``jax.distributed``) use the same program: every host loads the same data and seeds, the
step is identical on all of them, and only process 0 writes results.

Evaluation (the tasks' ``evaluate(..., mesh=mesh)``, :class:`dgjax.task.Task`) runs its jitted, masked chunks over the
same mesh: the chunk's example axis is split over all the mesh's devices (``"domain"`` and
``"data"`` flattened, :func:`eval_batch_sharding`), the model state is replicated, and the
returned sums are replicated scalars every process reads. Each process feeds only its rows
of every chunk (:func:`process_rows`, :func:`put_eval_batch`). Chunks whose size does not
divide by the device count are padded further (:func:`round_up_to_devices`); the padding is
masked out, so the sums are exact.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("domain", "data")


def parse_mesh_shape(
  spec: str | None, num_domains: int, devices: Sequence[Any] | None = None
) -> tuple[int, int]:
  """``"auto"``/``None``: all devices on ``data`` (``(1, n)``); ``"DxN"``: ``D`` devices over
  domains times ``N`` over the batch; ``D * N`` must equal the device count and ``D`` divide
  the number of training domains."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if spec in (None, "", "auto"):
    return (1, n)
  try:
    d, b = (int(v) for v in spec.lower().split("x"))
  except ValueError:
    raise ValueError(
      f"mesh shape {spec!r} is not of the form DOMAINSxDATA, e.g. 2x4 or auto"
    ) from None
  if d * b != n:
    raise ValueError(f"mesh shape {spec} uses {d * b} devices but {n} are available")
  if num_domains % d:
    raise ValueError(
      f"mesh shape {spec}: {d} devices over domains do not divide the "
      f"{num_domains} training domains"
    )
  return (d, b)


def make_mesh(shape: tuple[int, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("domain", "data")`` mesh of ``shape`` over ``devices`` (default: all)."""
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # GSPMD: the partitioner decides the rest
  if devices is None:
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``[D, B, ...]`` minibatches: domains over ``"domain"``, examples over ``"data"``."""
  return NamedSharding(mesh, P("domain", "data"))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf as a global array replicated over ``mesh`` (works across processes: each
  process supplies its own identical copy)."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def on_mesh(tree: Any, mesh: Mesh) -> Any:
  """``tree`` replicated over ``mesh`` (:func:`put_replicated`), keeping the leaves that
  already are: evaluation calls it per split and pays the host round trip once."""
  sharding = replicated(mesh)
  placed = lambda x: isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)
  return jax.tree.map(lambda x: x if placed(x) else put_replicated(x, mesh), tree)


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Evaluation chunks ``[N, ...]``: the example axis over all of ``mesh``'s devices
  (``"domain"`` and ``"data"`` flattened); the other axes whole."""
  return NamedSharding(mesh, P(AXES))


def round_up_to_devices(size: int, mesh: Mesh | None) -> int:
  """``size`` rounded up to a multiple of ``mesh``'s device count (unchanged without a mesh):
  an evaluation chunk is padded (and masked) further rather than refused."""
  n = 1 if mesh is None else mesh.devices.size
  return -(-size // n) * n


def process_rows(mesh: Mesh, size: int) -> np.ndarray:
  """The rows of a ``[size, ...]`` chunk under :func:`eval_batch_sharding` that this
  process's devices hold, ascending: what this process feeds :func:`put_eval_batch` (all of
  them in a single-process run). ``size`` must divide by the device count."""
  if size % mesh.devices.size:
    raise ValueError(
      f"an evaluation chunk of {size} examples does not divide over "
      f"{mesh.devices.size} devices (round it with round_up_to_devices)"
    )
  index = eval_batch_sharding(mesh).addressable_devices_indices_map((size,))
  spans = sorted({idx[0].indices(size)[:2] for idx in index.values()})
  return np.concatenate([np.arange(a, b) for a, b in spans])


def put_eval_batch(local: Any, mesh: Mesh, size: int) -> Any:
  """Global ``[size, ...]`` arrays sharded by :func:`eval_batch_sharding` from this
  process's rows (``local``: its :func:`process_rows` of each leaf, in that order), with
  ``jax.make_array_from_process_local_data``."""
  sharding = eval_batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (size,) + np.shape(x)[1:]
    ),
    local,
  )


def jit_eval(fn: Callable, mesh: Mesh | None, n_batch: int = 3) -> Callable:
  """``jax.jit(fn)`` for ``fn(model_state, *batch) -> scalar`` with ``n_batch`` batch
  arguments (default: ``x, y, valid``); with a mesh, explicit shardings: the model state
  replicated, every batch argument by :func:`eval_batch_sharding`, the result replicated
  (every process reads it)."""
  if mesh is None:
    return jax.jit(fn)
  batch = eval_batch_sharding(mesh)
  return jax.jit(
    fn, in_shardings=(replicated(mesh),) + (batch,) * n_batch, out_shardings=replicated(mesh)
  )


def local_copy(tree: Any) -> Any:
  """This process's copy of replicated global arrays, as ordinary single-device arrays."""
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def maybe_initialize_distributed(enabled: bool | None = None) -> bool:
  """``jax.distributed.initialize()`` when ``enabled`` (default: env ``DGJAX_DISTRIBUTED=1``),
  as big_vision gates it. On Cloud TPU and Slurm the coordinator, process count and id are
  discovered automatically; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID``. Returns whether it initialised."""
  if enabled is None:
    enabled = os.environ.get("DGJAX_DISTRIBUTED", "") not in ("", "0", "false", "False")
  if not enabled:
    return False
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  jax.distributed.initialize(**kwargs)
  return True
