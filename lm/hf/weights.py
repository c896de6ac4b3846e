"""Safetensors checkpoints read into, and written from, sharded parameters one tensor at a time.

Reading: every parameter is built with `jax.make_array_from_callback`, which asks this process
only for the shards its own devices hold; a shard reads the checkpoint tensors it needs (one
layer at a time for a stacked parameter) through `safe_open`, converts them and keeps its
slice. So a host holds its own shards plus one checkpoint tensor being converted, never the
model. Writing: each checkpoint tensor is assembled from one layer of our parameters (gathered
for that tensor alone), and files are flushed at `max_shard_bytes`, as transformers'
`save_pretrained` shards them.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bfloat16 checkpoints)
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import safe_open

from lm import config as lmc
from lm.hf.architectures import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_SHARD_BYTES = 2 << 30


class CheckpointFiles:
  """The safetensors files of a checkpoint directory: one file, or several with an index."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.file_of = dict(json.load(f)["weight_map"])
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      with safe_open(os.path.join(directory, SINGLE_FILE), "np") as f:
        self.file_of = dict.fromkeys(f.keys(), SINGLE_FILE)
    else:
      raise lmc.ConfigError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; an hf: model needs its safetensors "
        "weights (convert a pytorch_model.bin with transformers' save_pretrained)"
      )
    self._open = {}

  def _file(self, name: str):
    if name not in self.file_of:
      raise lmc.ConfigError(f"{self.directory}: the checkpoint has no tensor {name!r}")
    file = self.file_of[name]
    if file not in self._open:
      self._open[file] = safe_open(os.path.join(self.directory, file), "np")
    return self._open[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    return self._file(name).get_tensor(name)

  def check(self, tensors: list[Tensor]) -> None:
    """Every tensor the model needs is there with its shape: a one-line error otherwise,
    before anything is read."""
    for tensor in tensors:
      for name in tensor.names():
        if self.shape(name) != tensor.shape:
          raise lmc.ConfigError(
            f"{self.directory}: tensor {name!r} has shape {list(self.shape(name))}, but "
            f"config.json's model needs {list(tensor.shape)}"
          )

  def close(self) -> None:
    self._open.clear()


def load(files: CheckpointFiles, tensors: list[Tensor], abstract_params, shardings) -> dict:
  """The parameters (a pure dict like `abstract_params`) read from the checkpoint into their
  shardings. Every parameter must come from one of `tensors`."""
  files.check(tensors)
  source = {path: tensor for tensor in tensors for path in tensor.paths}
  abstract = traverse_util.flatten_dict(abstract_params)
  placed = traverse_util.flatten_dict(shardings)
  missing = sorted("/".join(path) for path in abstract if path not in source)
  if missing:  # a model option without a mapping: a bug here, not the checkpoint's fault
    raise NotImplementedError(f"no checkpoint tensor maps to {', '.join(missing)}")
  out = {}
  for path, spec in abstract.items():
    out[path] = _place(files, source[path], path, spec, placed[path])
  return traverse_util.unflatten_dict(out)


def _place(files, tensor: Tensor, path, spec, sharding) -> jax.Array:
  done = {}  # index -> shard: devices holding the same slice (replicas) read it once

  def shard(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in done:
      if tensor.layers:
        layers = range(tensor.layers)[index[0]]
        parts = [_part(files, tensor, path, i)[index[1:]] for i in layers]
        done[key] = np.stack(parts).astype(spec.dtype)
      else:
        done[key] = _part(files, tensor, path, None)[index].astype(spec.dtype)
    return done[key]

  return jax.make_array_from_callback(spec.shape, sharding, shard)


def _part(files, tensor: Tensor, path, layer) -> np.ndarray:
  name = tensor.name.format(i=layer) if tensor.layers else tensor.name
  return tensor.split(files.read(name))[path]


def write(
  directory: str,
  tensors: list[Tensor],
  params,
  mesh: jax.sharding.Mesh,
  dtype=np.float32,
  max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
  """Writes the checkpoint tensors of `params` (a pure dict of global arrays) as safetensors
  files in `directory` (process 0 writes; every process takes part in the gathers); the file
  names."""
  flat = traverse_util.flatten_dict(params)
  size = lambda t: math.prod(t.shape) * np.dtype(dtype).itemsize
  shards, current, total = [], [], 0
  for tensor in tensors:
    for name in tensor.names():
      if current and total + size(tensor) > max_shard_bytes:
        shards.append(current)
        current, total = [], 0
      current.append((tensor, name))
      total += size(tensor)
  shards.append(current)
  names = (
    [SINGLE_FILE]
    if len(shards) == 1
    else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  )
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  layer_of = _LayerGather(mesh)
  weight_map = {}
  for file, shard in zip(names, shards):
    arrays = {}
    for tensor, name in shard:
      layer = int(name.split(".")[_layer_field(tensor.name)]) if tensor.layers else None
      ours = {path: layer_of(flat[path], layer) for path in tensor.paths}
      arrays[name] = np.ascontiguousarray(tensor.join(ours)).astype(dtype)
      weight_map[name] = file
    if writer:
      safetensors.numpy.save_file(arrays, os.path.join(directory, file), {"format": "pt"})
  if writer and len(names) > 1:
    total_size = sum(size(t) for t in tensors for _ in t.names())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  return names


def _layer_field(template: str) -> int:
  return template.split(".").index("{i}")


class _LayerGather:
  """One layer of a stacked parameter (or a whole unstacked one) as a host numpy array, on
  every process: a jitted slice replicated over the mesh, compiled once per shape."""

  def __init__(self, mesh):
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.take = jax.jit(
      lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False),
      out_shardings=self.replicated,
    )
    self.whole = jax.jit(lambda x: x, out_shardings=self.replicated)

  def __call__(self, array, layer: int | None) -> np.ndarray:
    if layer is None:
      out = self.whole(array)
    else:
      out = self.take(array, jnp.int32(layer))
    return np.asarray(out.addressable_data(0)).astype(np.float32)
