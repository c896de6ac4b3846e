"""A sweep's search space: a small Python module (`--space=experiments/sweeps/demo.py`) naming
ranges or choices over `--config.*` fields.

  SPACE = {"optim.learning_rate": Float(1e-4, 1e-2, log=True), "optim.warmup_steps": Int(0, 100)}
  GRID = {"optim.learning_rate": [1e-3, 3e-3], "optim.warmup_steps": [0, 50]}  # --sampler=grid
  FIXED = {"train.total_steps": 160}  # applied to every trial, under the command's overrides

Without GRID, the grid sampler takes the values of the Choice fields (every field must be one).
No jax here: the sweep process only parses and samples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import optuna


@dataclasses.dataclass(frozen=True)
class Float:
  low: float
  high: float
  log: bool = False


@dataclasses.dataclass(frozen=True)
class Int:
  low: int
  high: int
  log: bool = False


class Choice:
  def __init__(self, *values):
    self.values = tuple(values)

  def __repr__(self) -> str:
    return f"Choice{self.values}"


@dataclasses.dataclass
class Space:
  path: str
  params: dict[str, Float | Int | Choice]
  grid: dict[str, list]
  fixed: dict[str, Any]

  def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's values, one per field (a retried trial gets its original values back)."""
    values = {}
    for field, p in self.params.items():
      if isinstance(p, Float):
        values[field] = trial.suggest_float(field, p.low, p.high, log=p.log)
      elif isinstance(p, Int):
        values[field] = trial.suggest_int(field, p.low, p.high, log=p.log)
      else:
        values[field] = trial.suggest_categorical(field, p.values)
    return values

  def grid_size(self) -> int:
    size = 1
    for values in self.grid.values():
      size *= len(values)
    return size


class SpaceError(ValueError):
  """A bad --space module; the message names the field and the fix."""


def load_space(path: str, grid_needed: bool = False) -> Space:
  """Reads and checks the module at `path` (one-line SpaceErrors)."""
  if not os.path.isfile(path):
    raise SpaceError(f"--space: {path!r} does not exist; e.g. --space=experiments/sweeps/demo.py")
  spec = importlib.util.spec_from_file_location("zerolm_sweep_space", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the user's module: any error is reported as its own one line
    raise SpaceError(f"--space: {path} does not load: {type(e).__name__}: {e}") from e
  params = getattr(module, "SPACE", None)
  if not isinstance(params, dict) or not params:
    raise SpaceError(f"--space: {path} defines no SPACE dict of field -> Float / Int / Choice")
  for field, p in params.items():
    _check_param(path, field, p)
  grid = getattr(module, "GRID", None)
  if grid is None:
    choices = {f: p.values for f, p in params.items() if isinstance(p, Choice)}
    grid = choices if len(choices) == len(params) else None
  if grid is not None:
    grid = {f: list(v) for f, v in grid.items()}
    if set(grid) != set(params) or not all(grid.values()):
      raise SpaceError(
        f"--space: {path}: GRID must give values for each SPACE field, and only those"
      )
  elif grid_needed:
    raise SpaceError(
      f"--space: {path}: --sampler=grid needs a GRID dict, or Choice values for every field"
    )
  fixed = dict(getattr(module, "FIXED", {}))
  if overlap := sorted(set(fixed) & set(params)):
    raise SpaceError(f"--space: {path}: {overlap[0]} is both searched (SPACE) and fixed (FIXED)")
  return Space(path, dict(params), grid or {}, fixed)


def _check_param(path: str, field: str, p) -> None:
  where = f"--space: {path}: SPACE[{field!r}]"
  if isinstance(p, Choice):
    if not p.values:
      raise SpaceError(f"{where}: Choice() needs at least one value")
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in p.values):
      raise SpaceError(f"{where}: Choice values must be None, bool, int, float or str")
    return
  if not isinstance(p, (Float, Int)):
    raise SpaceError(f"{where}: {p!r} is not a Float(low, high), Int(low, high) or Choice(...)")
  if not p.low < p.high:
    raise SpaceError(f"{where}: low {p.low!r} must be below high {p.high!r}")
  if p.log and p.low <= 0:
    raise SpaceError(f"{where}: a log range needs low > 0, not {p.low!r}")


def check_fields(space: Space, cfg, overridden: set[str]) -> None:
  """Every searched or fixed field exists in the experiment's config with a type its values
  fit, and the command line does not also set a searched one."""
  for field in [*space.params, *space.fixed]:
    node = cfg
    for part in field.split("."):
      if not hasattr(node, "keys") or part not in node:
        raise SpaceError(f"--space: {space.path}: {field!r} is not a config field of --config")
      node = node[part]
    entry = f"SPACE[{field!r}]" if field in space.params else f"FIXED[{field!r}]"
    values = _values(space.params[field]) if field in space.params else [space.fixed[field]]
    for value in [*values, *space.grid.get(field, [])]:
      if not fits(value, node):
        raise SpaceError(
          f"--space: {space.path}: {entry}: {value!r} does not fit the field's type "
          f"({type(node).__name__}, now {node!r}); give a value of that type"
        )
  if clash := sorted(overridden & set(space.params)):
    raise SpaceError(
      f"--config.{clash[0]}: the space searches this field; drop the override or the SPACE entry"
    )


def _values(p) -> list:
  """Values that stand for the parameter's type: a range's bounds, a choice's values."""
  if isinstance(p, Choice):
    return list(p.values)
  return [float(p.low), float(p.high)] if isinstance(p, Float) else [p.low, p.high]


def fits(value, current) -> bool:
  """Whether a config field holding `current` takes `value` (ml_collections' rules: an int fits a
  float field; None, and fields of other types, are left to the config's own checks)."""
  if value is None or current is None or not isinstance(current, (bool, int, float, str)):
    return True
  if isinstance(current, bool) or isinstance(value, bool):
    return isinstance(current, bool) and isinstance(value, bool)
  if isinstance(current, float):
    return isinstance(value, (int, float))
  return type(value) is type(current)


def override_flag(field: str, value) -> str:
  """The experiments.run flag that sets one field (config_flags parses the value by the field's
  type)."""
  return f"--config.{field}={value}"
