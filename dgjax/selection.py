"""Model selection within one run, as DomainBed defines it (Gulrajani & Lopez-Paz, 2021, §3).

Each record is one evaluation (a line of results.jsonl) with ``env{i}_in_acc`` and
``env{i}_out_acc`` for every environment ``i`` and the run's ``args`` in DomainBed's format
(:mod:`dgjax.domainbed_format`: ``args.test_envs``, ``args.hparams_seed``, ...).

- **Training-domain validation** (``IIDAccuracySelectionMethod``): the checkpoint with the
  highest mean ``out`` accuracy over the training environments.
- **Test-domain validation (oracle)** (``OracleSelectionMethod``): DomainBed allows one
  query per hyperparameter choice, at the *last* checkpoint (no early stopping); within a
  single run that is the last record.

The reported test accuracy is the test environments' mean ``in`` accuracy at the chosen
checkpoint.

Across a sweep (several hyperparameter seeds), :func:`select_hparams` applies one of
:data:`SWEEP_SELECTION_METHODS` (training-domain validation, leave-one-domain-out
cross-validation, test-domain oracle) as DomainBed's ``model_selection.py`` does;
:mod:`dgjax.collect` groups a sweep's records and makes the tables.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from dgjax.domainbed_format import num_envs, record_test_envs  # noqa: F401  (re-exported)

Record = dict[str, Any]


def training_domain_validation(records: Sequence[Record], test_envs: Sequence[int]) -> Record:
  """The record with the best mean out-split accuracy over the training environments
  (the earliest one on ties)."""
  if not records:
    raise ValueError("no evaluation records to select from")
  train_envs = [i for i in range(num_envs(records[0])) if i not in test_envs]
  return max(records, key=lambda r: sum(r[f"env{i}_out_acc"] for i in train_envs) / len(train_envs))


def oracle(records: Sequence[Record], test_envs: Sequence[int]) -> Record:
  """DomainBed's oracle within one run: the last checkpoint."""
  del test_envs
  if not records:
    raise ValueError("no evaluation records to select from")
  return records[-1]


SELECTION_METHODS = {
  "training-domain validation": training_domain_validation,
  "test-domain oracle (last step)": oracle,
}


def test_accuracy(record: Record, test_envs: Sequence[int]) -> float:
  return sum(record[f"env{i}_in_acc"] for i in test_envs) / len(test_envs)


def format_selection_table(
  records: Sequence[Record], test_envs: Sequence[int], env_names: Sequence[str] | None = None
) -> str:
  """A plain-text table: one row per selection method, the in-split accuracy of each
  environment at the selected step (test environments marked with ``*``)."""
  n = num_envs(records[0])
  names = list(env_names) if env_names else [f"env{i}" for i in range(n)]
  heads = (
    ["selection", "step"]
    + [f"{names[i]}{'*' if i in test_envs else ''}" for i in range(n)]
    + ["test acc"]
  )
  rows = []
  for label, select in SELECTION_METHODS.items():
    r = select(records, test_envs)
    rows.append(
      [label, str(r["step"])]
      + [f"{100 * r[f'env{i}_in_acc']:.1f}" for i in range(n)]
      + [f"{100 * test_accuracy(r, test_envs):.1f}"]
    )
  widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(heads)]
  fmt = lambda cells: "  ".join(
    c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
  )
  lines = [fmt(heads), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
  lines.append("accuracy (%) on each environment's in-split; * = test environment")
  return "\n".join(lines)


# ---------------------------------------------------------------- selection across a sweep
#
# DomainBed's ``model_selection.py`` (Gulrajani & Lopez-Paz, ICLR 2021, §3 and App. B.3):
# a selection method scores each run (one hyperparameter seed) by a validation accuracy and
# reports the test accuracy of the run with the best score. The functions below take every
# record of one hyperparameter seed within one ``(trial_seed, dataset, method, test_env)``
# group: the single-test-env run ``[test_env]`` and, for leave-one-domain-out, the runs
# ``[test_env, j]`` that also hold out a validation environment ``j``.


class RunAcc(NamedTuple):
  """A run's score: ``val_acc`` (what selection maximises), ``test_acc`` (what is reported:
  the test environment's in-split accuracy) and the ``step`` where they were read."""

  val_acc: float
  test_acc: float
  step: int


def _single_test_env_records(records: Sequence[Record], test_env: int) -> list[Record]:
  """The records of the run whose only test environment is ``test_env``, in step order
  (DomainBed's ``get_test_records``)."""
  chosen = [r for r in records if record_test_envs(r) == (test_env,)]
  return sorted(chosen, key=lambda r: r["step"])


def _nan_low(x: float) -> float:
  return float("-inf") if x != x else x


def iid_run_acc(records: Sequence[Record], test_env: int) -> RunAcc | None:
  """Training-domain validation (DomainBed's ``IIDAccuracySelectionMethod``): the checkpoint
  of the ``[test_env]`` run with the best mean out-split accuracy over the other environments
  (the earliest on ties)."""
  run = _single_test_env_records(records, test_env)
  if not run:
    return None
  val_envs = [i for i in range(num_envs(run[0])) if i != test_env]

  def score(r):
    return sum(r[f"env{i}_out_acc"] for i in val_envs) / len(val_envs)

  best = max(run, key=lambda r: _nan_low(score(r)))
  return RunAcc(score(best), best[f"env{test_env}_in_acc"], best["step"])


def oracle_run_acc(records: Sequence[Record], test_env: int) -> RunAcc | None:
  """Test-domain validation (DomainBed's ``OracleSelectionMethod``): the *last* checkpoint of
  the ``[test_env]`` run (no early stopping), scored by the test environment's out-split."""
  run = _single_test_env_records(records, test_env)
  if not run:
    return None
  last = run[-1]
  return RunAcc(last[f"env{test_env}_out_acc"], last[f"env{test_env}_in_acc"], last["step"])


def leave_one_out_run_acc(records: Sequence[Record], test_env: int) -> RunAcc | None:
  """Leave-one-domain-out cross-validation (DomainBed's ``LeaveOneOutSelectionMethod``).

  For every step, the score is the mean over the training environments ``j`` of the in-split
  accuracy of ``j`` in the run that held out both ``test_env`` and ``j`` (trained on the
  remaining ``n - 2`` environments); the reported accuracy is the ``[test_env]`` run's test
  in-split accuracy at the same step. A step needs the single-test-env record and one record
  for every ``j``; the best-scoring step wins (the earliest on ties). ``None`` without such a
  step, e.g. in a sweep without held-out pairs.
  """
  by_step: dict[int, list[Record]] = {}
  for r in records:
    by_step.setdefault(r["step"], []).append(r)
  best = None
  for step in sorted(by_step):
    group = by_step[step]
    tests = [r for r in group if record_test_envs(r) == (test_env,)]
    if len(tests) != 1:
      continue
    n = num_envs(tests[0])
    val = {}
    for r in group:
      envs = record_test_envs(r)
      if len(envs) == 2 and test_env in envs:
        j = envs[0] if envs[1] == test_env else envs[1]
        val[j] = r[f"env{j}_in_acc"]
    if any(j not in val for j in range(n) if j != test_env):
      continue
    acc = RunAcc(
      sum(val[j] for j in range(n) if j != test_env) / (n - 1),
      tests[0][f"env{test_env}_in_acc"],
      step,
    )
    if best is None or _nan_low(acc.val_acc) > _nan_low(best.val_acc):
      best = acc
  return best


class SweepSelectionMethod(NamedTuple):
  """A selection method across hyperparameters: DomainBed's name and its ``run_acc``."""

  name: str
  run_acc: Callable[[Sequence[Record], int], RunAcc | None]


TRAINING_DOMAIN = SweepSelectionMethod("training-domain validation set", iid_run_acc)
LEAVE_ONE_OUT = SweepSelectionMethod("leave-one-domain-out cross-validation", leave_one_out_run_acc)
ORACLE = SweepSelectionMethod("test-domain validation set (oracle)", oracle_run_acc)

#: In DomainBed's order (``collect_results.py``).
SWEEP_SELECTION_METHODS = {
  "training_domain": TRAINING_DOMAIN,
  "leave_one_out": LEAVE_ONE_OUT,
  "oracle": ORACLE,
}


def record_hparams_seed(record: Record) -> int:
  return int(record["args"]["hparams_seed"])


def select_hparams(
  records: Sequence[Record], test_env: int, method: SweepSelectionMethod
) -> tuple[int, RunAcc] | None:
  """The best hyperparameter seed for one ``(trial_seed, dataset, method, test_env)`` group
  and its :class:`RunAcc` (DomainBed's ``hparams_accs(...)[0]``).

  Records are grouped by ``args.hparams_seed``; runs ``method.run_acc`` cannot score are
  dropped. Ties in ``val_acc`` go to the largest hparams seed, as DomainBed's stable sort by
  seed followed by a descending sort by ``val_acc`` does. ``None`` if no run scores.
  """
  by_seed: dict[int, list[Record]] = {}
  for r in records:
    by_seed.setdefault(record_hparams_seed(r), []).append(r)
  scored = [(seed, method.run_acc(recs, test_env)) for seed, recs in sorted(by_seed.items())]
  scored = [(seed, acc) for seed, acc in scored if acc is not None]
  if not scored:
    return None
  return max(scored, key=lambda s: (_nan_low(s[1].val_acc), s[0]))
