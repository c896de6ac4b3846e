"""Safetensors checkpoints read into, and written from, sharded parameters one tensor at a time.

Reading: every parameter is assembled from the shards this process's own devices hold, each
built on the host, copied to its devices and dropped before the next. A shard reads the
checkpoint tensors it needs (one layer at a time for a stacked parameter; an unstacked one is
read once for all its shards) in chunks, each from a file opened for that chunk alone
(safetensors maps files, and a mapping's pages count in RSS until it is closed); conversions
are views where they can be. So beyond its own
shards a host holds one checkpoint tensor and one shard, never the model (measured by
experiments/bench_hf_load.py). Writing: each checkpoint tensor is assembled from one layer of
our parameters (gathered for that tensor alone), and files are cut at `max_shard_bytes`
(2 GiB) with an index, a layout transformers' `from_pretrained` reads.
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
READ_CHUNK_BYTES = 4 << 20


class CheckpointFiles:
  """The safetensors files of a checkpoint directory: one file, or several with an index."""

  def __init__(self, directory: str):
    self.directory = directory
    self._shapes = {}
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.file_of = dict(json.load(f)["weight_map"])
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      self.file_of = dict.fromkeys(self._read_shapes(SINGLE_FILE), SINGLE_FILE)
    else:
      raise lmc.ConfigError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; an hf: model needs its safetensors "
        "weights (convert a pytorch_model.bin with transformers' save_pretrained)"
      )

  def _read_shapes(self, file: str) -> dict[str, tuple[int, ...]]:
    if file not in self._shapes:
      with safe_open(os.path.join(self.directory, file), "np") as f:
        self._shapes[file] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return self._shapes[file]

  def _stored(self, name: str) -> str:
    """The name a tensor has in the files: as transformers' *For* model names it, or without
    the base model's prefix (the original GPT-2 checkpoints store wte.weight, h.0...., not
    transformer.wte.weight; transformers adds it on load)."""
    if name not in self.file_of:
      base, _, rest = name.partition(".")
      if base in ("transformer", "model") and rest in self.file_of:
        return rest
    return name

  def _file(self, name: str) -> str:
    file = self.file_of.get(name)
    if file is None or name not in self._read_shapes(file):
      raise lmc.ConfigError(f"{self.directory}: the checkpoint has no tensor {name!r}")
    return file

  def shape(self, name: str) -> tuple[int, ...]:
    name = self._stored(name)
    return self._shapes[self._file(name)][name]

  def read(self, name: str) -> np.ndarray:
    """One tensor, copied out READ_CHUNK_BYTES of rows at a time, each from the file opened for
    that chunk alone: safe_open maps the file, and the pages a read touches stay in this
    process's RSS until the file is closed (a whole-tensor read would hold it twice)."""
    name = self._stored(name)
    path, shape = os.path.join(self.directory, self._file(name)), self.shape(name)
    if not shape or shape[0] == 0:
      with safe_open(path, "np") as f:
        return f.get_tensor(name)
    out = None
    row_bytes = max(math.prod(shape[1:]), 1) * 4
    rows = max(1, READ_CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], rows):
      stop = min(start + rows, shape[0])  # get_slice does not clip
      with safe_open(path, "np") as f:
        chunk = f.get_slice(name)[start:stop]
      if out is None:
        out = np.empty(shape, chunk.dtype)
      out[start:stop] = chunk
    return out

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
    self._shapes.clear()


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
  """One parameter from the shards of this process's devices. Each distinct shard (replicas
  share one) is built on the host, copied to its devices and dropped before the next:
  `make_array_from_callback` would hold every host shard until it has copied them all."""
  indices = sharding.addressable_devices_indices_map(spec.shape)
  replicas = {}  # shard -> (index, devices)
  for device, index in indices.items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    replicas.setdefault(key, (index, []))[1].append(device)
  # An unstacked tensor is read once for all its shards; a stacked one a layer at a time.
  whole = _part(files, tensor, path, None, spec.shape) if indices and not tensor.layers else None
  arrays = {}
  for index, devices in replicas.values():
    host = _shard(files, tensor, path, spec, index, whole)
    for device in devices:
      arrays[device] = jax.device_put(host, device)
    # The copy runs in the background, holding `host`: wait, or several shards pile up.
    jax.block_until_ready([arrays[device] for device in devices])
    del host
  del whole
  return jax.make_array_from_single_device_arrays(
    spec.shape, sharding, [arrays[device] for device in indices]
  )


def _shard(files, tensor: Tensor, path, spec, index, whole) -> np.ndarray:
  shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, spec.shape))
  if not tensor.layers and whole[index].shape == shape:
    # A view, strided or not: device_put copies it into the device buffer, no host copy.
    return whole[index].astype(spec.dtype, copy=False)
  out = np.zeros(shape, spec.dtype)  # what a split leaves out at the end stays zeros
  if tensor.layers:
    for j, layer in enumerate(range(tensor.layers)[index[0]]):
      _fill(out[j], _part(files, tensor, path, layer, spec.shape[1:]), index[1:])
  else:
    _fill(out, whole, index)
  return out


def _fill(out: np.ndarray, part: np.ndarray, index) -> None:
  """out = part[index] (converted to out's dtype), where `part` may stop short of the
  parameter at the end of a dimension (vocab rows padded for the mesh): out keeps its zeros."""
  chunk = part[index]
  out[tuple(slice(0, n) for n in chunk.shape)] = chunk


def _part(files, tensor: Tensor, path, layer, shape) -> np.ndarray:
  """The parameter's array (one layer's) that the checkpoint tensor holds, often a view."""
  name = tensor.name.format(i=layer) if tensor.layers else tensor.name
  part = tensor.split(files.read(name))[path]
  if part.ndim != len(shape) or any(p > n for p, n in zip(part.shape, shape)):
    raise ValueError(f"{name} splits into {part.shape} for {'/'.join(path)} of {shape}")
  return part


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
      # Every process takes part in the same gathers, in the same order; process 0 writes.
      ours = {path: layer_of(flat[path], layer) for path in tensor.paths}
      if writer:
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
