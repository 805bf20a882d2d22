"""Percentile bootstrap confidence intervals, by image or by patient (cluster bootstrap).

Chest X-ray test sets hold several studies per patient; resampling images as if they were
independent understates the uncertainty, so every function here can resample *groups*
(patient ids) and take all their rows. Two entry points share one random stream, so for the
same seed they draw the same resamples:

- `bootstrap_ci`: any statistic of resampled arrays (rows gathered per resample).
- `bootstrap_ci_weighted`: statistics written as functions of per-row resample counts
  (a [R, N] weight matrix). The report functions use it: presorted scores and matrix products
  evaluate hundreds of resamples at once instead of re-sorting each one.

A resample where a statistic is undefined (None or NaN, e.g. no positives drawn) is dropped;
with fewer than half the resamples valid the interval is (nan, nan).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

# Rows x resamples held in memory at once by bootstrap_ci_weighted (float64: 8 bytes each).
_WEIGHT_ELEMENTS_PER_CHUNK = 2_000_000


def _check_settings(n_resamples: int, level: float, min_resamples: int) -> None:
  if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) \
      or n_resamples < min_resamples:
    raise ValueError(f"n_resamples={n_resamples!r}: expected an integer >= {min_resamples}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level!r}: expected a confidence level in (0, 1), e.g. 0.95")


def resampling_units(num_rows: int, groups: np.ndarray | None) -> tuple[np.ndarray, int]:
  """(unit index of each row [N], number of units): rows themselves, or distinct group ids."""
  if groups is None:
    return np.arange(num_rows), num_rows
  groups = np.asarray(groups)
  if groups.shape != (num_rows,):
    raise ValueError(f"groups has shape {groups.shape}; expected ({num_rows},), one group id "
                     f"(e.g. patient id) per row")
  try:
    _, unit_of_row = np.unique(groups, return_inverse=True)
  except TypeError as error:  # e.g. a mix of str and None in an object array
    raise ValueError(f"groups (dtype {groups.dtype}) could not be sorted to find distinct ids: "
                     f"{error}; expected ids of one comparable type") from error
  unit_of_row = unit_of_row.reshape(-1)
  return unit_of_row, int(unit_of_row.max()) + 1 if num_rows else 0


def _unit_draws(num_units: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
  """Per resample, the units drawn with replacement. One call per resample, so the stream
  does not depend on how callers batch resamples."""
  rng = np.random.default_rng(seed)
  for _ in range(n_resamples):
    yield rng.integers(0, num_units, size=num_units)


def _percentile_interval(values: np.ndarray, n_resamples: int,
                         level: float) -> tuple[float, float, int]:
  valid = values[np.isfinite(values)]
  if 2 * valid.size < n_resamples:
    return float("nan"), float("nan"), int(valid.size)
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(valid, [tail, 100.0 - tail])
  return float(low), float(high), int(valid.size)


def _as_float(value) -> float:
  return float("nan") if value is None else float(value)


def bootstrap_ci(statistic: Callable[..., float | None], arrays: Sequence[np.ndarray], *,
                 groups: np.ndarray | None = None, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, int]:
  """Percentile bootstrap interval of `statistic(*resampled_arrays)`.

  Args:
    statistic: maps the resampled arrays to a float, or None/NaN where undefined.
    arrays: arrays sharing axis 0 (rows), resampled together.
    groups: optional [N] ids of any sortable dtype (e.g. patient ids): whole groups are
      drawn with replacement and all their rows taken; None resamples rows.
    n_resamples, seed, level: number of resamples, RNG seed, two-sided confidence level.

  Returns:
    (low, high, n_valid_resamples); (nan, nan, n_valid) when fewer than half are valid.
  """
  _check_settings(n_resamples, level, min_resamples=1)
  arrays = [np.asarray(array) for array in arrays]
  if not arrays:
    raise ValueError("arrays is empty; expected at least one array to resample")
  num_rows = arrays[0].shape[0] if arrays[0].ndim else 0
  for position, array in enumerate(arrays):
    if array.ndim == 0 or array.shape[0] != num_rows:
      raise ValueError(f"arrays[{position}] has shape {array.shape}; expected axis 0 of length "
                       f"{num_rows} like arrays[0]")
  if num_rows == 0:
    raise ValueError("arrays have 0 rows; expected at least one row to resample")
  unit_of_row, num_units = resampling_units(num_rows, groups)
  # Rows of each unit as a contiguous slice of `rows_by_unit`, to gather drawn units at once.
  rows_by_unit = np.argsort(unit_of_row, kind="stable")
  unit_sizes = np.bincount(unit_of_row, minlength=num_units)
  unit_starts = np.concatenate([[0], np.cumsum(unit_sizes)[:-1]])
  values = np.empty(n_resamples)
  for resample, drawn in enumerate(_unit_draws(num_units, n_resamples, seed)):
    if groups is None:
      rows = drawn
    else:
      sizes = unit_sizes[drawn]
      offsets_within_unit = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
      rows = rows_by_unit[np.repeat(unit_starts[drawn], sizes) + offsets_within_unit]
    values[resample] = _as_float(statistic(*(array[rows] for array in arrays)))
  return _percentile_interval(values, n_resamples, level)


def bootstrap_ci_weighted(statistics: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                          num_rows: int, *, groups: np.ndarray | None = None,
                          n_resamples: int = 1000, seed: int = 0,
                          level: float = 0.95) -> dict[str, tuple[float, float, int]]:
  """Percentile bootstrap intervals of several statistics written over resample weights.

  `statistics(weights)` gets a float [R, N] matrix, row r holding how often each of the N rows
  appears in resample r (a row drawn twice counts twice), and returns {name: [R] values}, NaN
  where undefined. The resamples are the ones `bootstrap_ci` draws for the same seed/groups.

  Returns:
    {name: (low, high, n_valid_resamples)}, (nan, nan, n_valid) when fewer than half are valid.
  """
  _check_settings(n_resamples, level, min_resamples=1)
  if num_rows <= 0:
    raise ValueError(f"num_rows={num_rows}; expected at least one row to resample")
  unit_of_row, num_units = resampling_units(num_rows, groups)
  chunk = max(1, min(n_resamples, _WEIGHT_ELEMENTS_PER_CHUNK // num_rows))
  collected: dict[str, list[np.ndarray]] = {}
  draws = _unit_draws(num_units, n_resamples, seed)
  for start in range(0, n_resamples, chunk):
    size = min(chunk, n_resamples - start)
    unit_counts = np.stack([np.bincount(next(draws), minlength=num_units) for _ in range(size)])
    weights = unit_counts[:, unit_of_row].astype(np.float64)
    for name, values in statistics(weights).items():
      values = np.asarray(values, dtype=np.float64)
      if values.shape != (size,):
        raise ValueError(f"statistics returned {name!r} with shape {values.shape}; expected "
                         f"({size},), one value per resample")
      collected.setdefault(name, []).append(values)
  return {name: _percentile_interval(np.concatenate(parts), n_resamples, level)
          for name, parts in collected.items()}
