"""Helpers over nested parameter dicts: paths, counts, masks, and the parts of a tree."""

from __future__ import annotations

import re

import jax
import numpy as np

from lm import config as lmc

# With LoRA or adapters on and train.trainable empty, only their parameters train.
ADAPTATION_PARAMS = r"_lora/|_adapter/"
CLASSIFIER_HEAD = r"^head/"  # task=classify: trains with whatever train.trainable selects


def param_paths(tree) -> dict:
  """The tree with each leaf replaced by its path, "decoder/layers/mlp/wi"."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
  )


NO_DECAY_NAMES = ("scale", "bias")  # norms' scales and biases: no weight decay, no matmul


def decay_mask(params):
  """True for matmul parameters (what weight decay applies to): not norms' scales, not biases."""

  def path_decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not any(name == n or name.endswith("_" + n) for n in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(path_decays, params)


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def trainable_mask(cfg, abstract_params) -> dict:
  """Per parameter: whether train.trainable (or, by default, the adaptation) trains it."""
  pattern = cfg.train.trainable
  if not pattern and (cfg.model.lora_rank or cfg.model.adapter_dim):
    pattern = ADAPTATION_PARAMS
  if pattern and cfg.task == "classify":
    pattern = f"{CLASSIFIER_HEAD}|(?:{pattern})"  # a fresh head always trains
  mask = jax.tree.map(lambda path: bool(re.search(pattern, path)), param_paths(abstract_params))
  if not any(jax.tree.leaves(mask)):
    raise lmc.ConfigError(
      f"config.train.trainable: {pattern!r} matches no parameter; paths look like "
      "decoder/layers/mlp/wi or embed/table"
    )
  return mask


def select(tree: dict, mask: dict) -> dict:
  """The entries of a nested dict whose mask is True (emptied branches dropped)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      part = select(value, mask[key])
      if part:
        out[key] = part
    elif mask[key]:
      out[key] = value
  return out


def merge(tree: dict, part: dict) -> dict:
  """`tree` with the entries of `part` (a `select` of a tree of its structure) replaced."""
  out = dict(tree)
  for key, value in part.items():
    out[key] = merge(tree[key], value) if isinstance(value, dict) else value
  return out


def placed(shapes, shardings):
  """Abstract arrays: `shapes` (anything with .shape and .dtype) laid out as `shardings`."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
