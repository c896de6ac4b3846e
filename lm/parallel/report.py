"""What a compiled train step costs: per-device bytes by kind and collective traffic from HLO.

Accounting (docs/architecture.md): params fp32 4 B, grads fp32 4 B, Adam m+v 8 B per parameter. Per
device with N = fsdp size: Z0 16Ψ; Z1 8Ψ + 8Ψ/N; Z2 4Ψ + 12Ψ/N; Z3 16Ψ/N.
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


def formula_bytes(
  num_params: int, zero_stage: int, fsdp: int, tensor: int = 1, replicated: int = 0
) -> dict:
  """The accounting for fp32 params, fp32 grads and Adam (m, v), per device; `tensor` divides
  everything (norm scales are the small exception, replicated over tensor). `replicated`
  parameters have no dimension fsdp divides: a stage that shards their kind keeps them whole."""
  kept = replicated if fsdp > 1 else 0
  per_device = {
    k: ((num_params - kept) / fsdp + kept if k in _STAGE_KINDS[zero_stage] else num_params) / tensor
    for k in _KINDS
  }
  return {
    "params": 4 * per_device["params"],
    "grads": 4 * per_device["grads"],
    "opt_state": 8 * per_device["opt_state"],
  }


_KINDS = ("params", "grads", "opt_state")
_STAGE_KINDS = {0: (), 1: ("opt_state",), 2: ("opt_state", "grads"), 3: _KINDS}


def _type_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def _group_size(line: str, num_devices: int) -> int:
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'([\w]+)'=(\d+)", named.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'([\w]+)'", named.group(2))]))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit and explicit.group(1):
    return len(explicit.group(1).split(","))
  return num_devices


def collective_traffic(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
  """Per op kind: count, result bytes and bandwidth bytes per device per step.

  Ops inside while loops (the layer and microbatch scans) count once per iteration, using
  XLA's known trip counts. Bandwidth: all-reduce 2S(N-1)/N; all-gather S(N-1)/N with S the
  gathered size; reduce-scatter S(N-1)/N with S the unscattered size.
  """
  calls, ops = collections.defaultdict(list), collections.defaultdict(list)
  current = None
  entry = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(2)
      if header.group(1):
        entry = current
      continue
    if current is None or "=" not in line:
      continue
    op_match = re.search(r"=\s*(.*?)\s([a-z\-]+)\(", line)
    if not op_match:
      continue
    type_text, op = op_match.groups()
    base_op = op.removesuffix("-start")
    if base_op in COLLECTIVES:
      ops[current].append((base_op, _type_bytes(type_text), _group_size(line, num_devices)))
    if op == "while":
      trip = re.search(r'known_trip_count[^0-9]*"?n"?\s*:\s*"?(\d+)', line)
      body = re.search(r"body=%?([\w.\-]+)", line)
      if body:
        calls[current].append((body.group(1), int(trip.group(1)) if trip else 1))
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
  report = {k: {"count": 0, "bytes": 0.0, "bandwidth_bytes": 0.0} for k in COLLECTIVES}
  for name, entries in ops.items():
    for op, size, n in entries:
      times = multiplier.get(name, 0)
      if n <= 1 or times == 0:
        continue
      if op == "all-reduce":
        cost = 2 * size * (n - 1) / n
      elif op == "reduce-scatter":
        cost = size * n * (n - 1) / n  # result is the scattered shard
      else:
        cost = size * (n - 1) / n
      report[op]["count"] += times
      report[op]["bytes"] += times * size
      report[op]["bandwidth_bytes"] += times * cost
  return report
