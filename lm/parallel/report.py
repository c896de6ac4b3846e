"""What a compiled train step costs: per-device bytes of placed arrays, collective traffic and
matmul FLOPs from the HLO. The formulas these are held to live in lm/parallel/memory.py.
"""

from __future__ import annotations

import collections
import re

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
  "f32": 4,
  "f16": 2,
  "bf16": 2,
  "f64": 8,
  "s32": 4,
  "u32": 4,
  "s8": 1,
  "u8": 1,
  "pred": 1,
  "s64": 8,
  "u64": 8,
  "s16": 2,
  "u16": 2,
}


def shard_bytes(tree) -> int:
  """Bytes of a tree of arrays held by the first addressable device."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def sharded_bytes(abstract_tree, shardings) -> int:
  """Per-device bytes of abstract arrays under shardings (no allocation)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * leaf.dtype.itemsize
  return total


def _type_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _iota(dims: str, perm: str | None) -> np.ndarray:
  """XLA's iota device list `[dims]T(perm)`: arange reshaped to dims, then transposed."""
  ids = np.arange(int(np.prod([int(d) for d in dims.split(",")])))
  ids = ids.reshape([int(d) for d in dims.split(",")])
  return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def _first_group(line: str, num_devices: int) -> list[int]:
  """The device positions of an op's first replica group."""
  named = re.search(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
    r"\s*\{([^}]*)\}",
    line,
  )
  if named:
    axes, dims, perm, grouped = named.groups()
    sizes = [(a, int(n)) for a, n in re.findall(r"'([\w]+)'=(\d+)", axes)]
    ids = _iota(dims, perm) if dims else np.arange(num_devices)
    ids = ids.reshape([n for _, n in sizes])
    grouped = set(re.findall(r"'([\w]+)'", grouped))
    return ids[tuple(slice(None) if a in grouped else 0 for a, _ in sizes)].ravel().tolist()
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if iota:
    groups, size, dims, perm = iota.groups()
    return _iota(dims, perm).reshape(int(groups), int(size))[0].tolist()
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit and explicit.group(1):
    return [int(i) for i in explicit.group(1).split(",")]
  return list(range(num_devices))


def _group_axes(line: str, mesh_shape: dict[str, int]) -> tuple[tuple[str, ...], int]:
  """(mesh axes an op's replica groups span, group size). Device positions index the mesh's
  devices in row-major order, as the compiled program's device assignment does."""
  group = _first_group(line, int(np.prod(list(mesh_shape.values()))))
  coords = np.array(np.unravel_index(group, tuple(mesh_shape.values())))  # [axes, members]
  axes = tuple(a for a, c in zip(mesh_shape, coords) if len(set(c.tolist())) > 1)
  return axes, len(group)


def _permute_axes(line: str, mesh_shape: dict[str, int]) -> tuple[tuple[str, ...], int]:
  """(mesh axes a collective-permute's source -> target pairs cross, 2: one send per device)."""
  pairs = re.search(r"source_target_pairs=\{([^=]*)\}", line)
  found = re.findall(r"\{(\d+),(\d+)\}", pairs.group(1)) if pairs else []
  shape = tuple(mesh_shape.values())
  axes = set()
  for source, target in found:
    a, b = np.unravel_index(int(source), shape), np.unravel_index(int(target), shape)
    axes |= {name for name, i, j in zip(mesh_shape, a, b) if i != j}
  return tuple(a for a in mesh_shape if a in axes), 2 if found else 1


def _computations(hlo_text: str):
  """(lines of each computation, times each runs per step, the entry's name): while bodies
  count their known trip counts, fusions and calls once per caller's run."""
  calls, lines = collections.defaultdict(list), collections.defaultdict(list)
  current = entry = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(2)
      if header.group(1):
        entry = current
      continue
    if current is None or "=" not in line:
      continue
    lines[current].append(line)
    if re.search(r"\swhile\(", line):
      trip = re.search(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)', line)
      body = re.search(r"body=%?([\w.\-]+)", line)
      if body:
        calls[current].append((body.group(1), int(trip.group(1)) if trip else 1))
    if re.search(r"\scall\(", line):  # unoptimized HLO (Lowered.as_text(dialect="hlo"))
      calls[current] += [(c, 1) for c in re.findall(r"to_apply=%?([\w.\-]+)", line)]
    for callee in re.findall(r"(?:calls|true_computation|false_computation)=%?([\w.\-]+)", line):
      calls[current].append((callee, 1))
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
      for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
        calls[current].append((callee, 1))
  multiplier = collections.Counter()

  def visit(name, factor):
    multiplier[name] += factor
    for callee, trip in calls.get(name, ()):
      visit(callee, factor * trip)

  visit(entry, 1)
  return lines, multiplier


def dot_flops(hlo_text: str) -> float:
  """Matmul FLOPs per device per step from the compiled HLO, 2 * output elements * contracted
  size per dot, loops counted per iteration. XLA's cost_analysis() counts a while loop's body
  once whatever its trip count (checked on CPU, jax 0.10.2), so the layer, microbatch and
  pipeline scans would vanish from it. Counts HLO `dot`s, as CPU and TPU programs keep them; a
  GPU program's matmuls are library custom-calls (cuBLAS), which it does not count."""
  lines, multiplier = _computations(hlo_text)
  total = 0.0
  for name, body in lines.items():
    times = multiplier.get(name, 0)
    if not times:
      continue
    shapes = {}  # this computation's values: %name -> dims (operands print without types)
    for line in body:
      value = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[a-z]+\d*\[([\d,]*)\]", line)
      if value:
        shapes[value.group(1)] = _dims(value.group(2))
    for line in body:
      dot = re.search(r"=\s*[a-z]+\d*\[([\d,]*)\]\S*\s+dot\(%?([\w.\-]+)", line)
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
      if not dot or dot.group(2) not in shapes:
        continue
      lhs = shapes[dot.group(2)]
      contracted = [lhs[i] for i in _dims(contracting.group(1))] if contracting else []
      total += times * 2 * float(np.prod(_dims(dot.group(1)) or [1])) * float(np.prod(contracted))
  return total


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def collective_traffic(hlo_text: str, mesh_shape: dict[str, int]) -> dict[str, dict]:
  """Per op kind: count, result bytes and bandwidth bytes per device per step, and the
  bandwidth bytes per set of mesh axes the ops run over (`by_axes`, keys like "data+fsdp").

  Ops inside while loops (the layer and microbatch scans) count once per iteration, using
  XLA's known trip counts. Bandwidth: all-reduce 2S(N-1)/N; all-gather S(N-1)/N with S the
  gathered size; reduce-scatter S(N-1)/N with S the unscattered size; collective-permute S
  (each device sends its buffer once).
  """
  lines, multiplier = _computations(hlo_text)
  ops = collections.defaultdict(list)
  for current, body in lines.items():
    for line in body:
      op_match = re.search(r"=\s*(.*?)\s([a-z\-]+)\(", line)
      if not op_match:
        continue
      type_text, op = op_match.groups()
      base_op = op.removesuffix("-start")
      if base_op == "collective-permute":
        # An async start's type is (operand, result, contexts): one buffer travels.
        sent = re.match(r"\(?\s*([a-z]+\d*\[[\d,]*\])", type_text)
        size = _type_bytes(sent.group(1) if sent else type_text)
        ops[current].append((base_op, size, *_permute_axes(line, mesh_shape)))
      elif base_op in COLLECTIVES:
        ops[current].append((base_op, _type_bytes(type_text), *_group_axes(line, mesh_shape)))
  report = {
    k: {"count": 0, "bytes": 0.0, "bandwidth_bytes": 0.0, "by_axes": {}} for k in COLLECTIVES
  }
  for name, entries in ops.items():
    for op, size, axes, n in entries:
      times = multiplier.get(name, 0)
      if n <= 1 or times == 0:
        continue
      if op == "all-reduce":
        cost = 2 * size * (n - 1) / n
      elif op == "reduce-scatter":
        cost = size * n * (n - 1) / n  # result is the scattered shard
      elif op == "collective-permute":
        cost = size
      else:
        cost = size * (n - 1) / n
      report[op]["count"] += times
      report[op]["bytes"] += times * size
      report[op]["bandwidth_bytes"] += times * cost
      by_axes = report[op]["by_axes"]
      by_axes["+".join(axes)] = by_axes.get("+".join(axes), 0.0) + times * cost
  return report
