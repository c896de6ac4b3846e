"""The memory model of one train step: state bytes per ZeRO stage, activations per remat policy,
step FLOPs with recomputation and a step-time cost model over a table of chips.

Per device, a step holds its arguments (params, optimizer state, the batch; the outputs alias
them) and its temporaries (`memory_analysis().temp_size_in_bytes`): the gradient accumulator,
the optimizer update's temporaries and the activations. State accounting (docs/architecture.md):
params fp32 4 B, grads fp32 4 B, Adam m+v 8 B per parameter; Z0 16Ψ; Z1 8Ψ + 8Ψ/N; Z2
4Ψ + 12Ψ/N; Z3 16Ψ/N. With frozen parameters (train.trainable, LoRA, adapters) grads and
opt_state count the T trainable ones only: Z0 4Ψ + 12T, ..., Z3 (4Ψ + 12T)/N.

Activations are counted per token in elements of the compute dtype (`activation_terms`): what
each remat policy keeps per layer, one layer's working set in the backward, attention scores,
the loss's float32 logits and their gradient. The per-layer element counts are fitted to XLA's
buffer assignment (docs/parallelism.md, "Memory model": which terms are exact, which fitted).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

from lm import config as lmc
from lm import trees
from lm.config import ConfigError
from lm.parallel import mesh as lm_mesh
from lm.parallel import sharding

_KINDS = ("params", "grads", "opt_state")
_STAGE_KINDS = {0: (), 1: ("opt_state",), 2: ("opt_state", "grads"), 3: _KINDS}


def formula_bytes(
  num_params: int,
  zero_stage: int,
  fsdp: int,
  tensor: int = 1,
  replicated: int = 0,
  trainable: int | None = None,
  replicated_trainable: int | None = None,
) -> dict:
  """The accounting for fp32 params, fp32 grads and Adam (m, v), per device; `tensor` divides
  everything (norm scales are the small exception, replicated over tensor). `replicated`
  parameters have no dimension fsdp divides: a stage that shards their kind keeps them whole.
  `trainable` (default all) of them have gradients and optimizer state, `replicated_trainable`
  of those replicated."""
  counts = {
    "params": (num_params, replicated),
    "grads": (num_params if trainable is None else trainable, replicated_trainable),
    "opt_state": (num_params if trainable is None else trainable, replicated_trainable),
  }
  per_device = {}
  for k, (count, whole) in counts.items():
    whole = (replicated if whole is None else whole) if fsdp > 1 else 0
    sharded = k in _STAGE_KINDS[zero_stage]
    per_device[k] = ((count - whole) / fsdp + whole if sharded else count) / tensor
  return {
    "params": 4 * per_device["params"],
    "grads": 4 * per_device["grads"],
    "opt_state": 8 * per_device["opt_state"],
  }


# Elements per token per layer, per unit of width: `d` the model width (replicated over
# tensor); `qkv` the query/key/value width ((heads + 2 kv heads) * head_dim); `scores` heads *
# key length; `mlp_<kind>` the MLP width by activation kind (MLP_KINDS: autodiff keeps more of
# a transcendental activation than of relu, and a gated MLP has two inputs); all but `d` split
# over tensor. KEPT_PER_LAYER: what the policy keeps of every layer until its backward;
# WORKING_SET: what one layer's backward adds (its recomputed residuals). Fitted by least
# squares to the temp bytes of 37 CPU compiles (jax 0.10.2; docs/parallelism.md, "Memory
# model"); the structure (which terms add, which overlap) is not.
UNITS = ("d", "qkv", "scores", "mlp_relu", "mlp_gelu", "mlp_glu")
KEPT_PER_LAYER = {  # per unit of UNITS
  "none": dict(zip(UNITS, (3.16, 3.52, 1.99, 1.53, 6.0, 7.13))),
  "save_dots": dict(zip(UNITS, (1.09, 1.25, 0.0, 1.01, 1.04, 2.21))),
  "full": dict(zip(UNITS, (1.0, 0.0, 0.0, 0.0, 0.0, 0.0))),
}
WORKING_SET = {
  "none": dict(zip(UNITS, (0.0, 0.0, 1.55, 1.18, 1.13, 5.1))),
  "save_dots": dict(zip(UNITS, (1.26, 3.94, 3.95, 0.82, 0.5, 0.38))),
  "full": dict(zip(UNITS, (4.07, 3.12, 2.82, 3.45, 3.71, 7.39))),
}
MLP_KINDS = {"relu": "relu", "gelu": "gelu", "gelu_exact": "gelu", "silu": "gelu", "swiglu": "glu"}
# The update's temporaries (the mean gradient, Adam's new moments and parameters before the
# finite-step select), per fp32 byte of the parameters in the update's layout: fitted (2.73x
# the parameter bytes in all, less the gradient's 1x), after the backward's activations are gone.
UPDATE_TEMPORARIES = 1.73


def balanced_chunks(length: int, chunk: int) -> tuple[int, int]:
  """(count, size): `length` positions in chunks of at most `chunk` (0 = one chunk), all of one
  size, so padding the last costs fewer than `count` positions (513 at 512: 2 x 257, not
  2 x 512). Chunked attention, the chunked loss and this formula split alike."""
  if not chunk or chunk >= length:
    return 1, length
  count = -(-length // chunk)
  return count, -(-length // count)


def _resolved_chunk(chunk: int, length: int) -> int:
  return balanced_chunks(length, chunk)[1]


def _layer_widths(dims, tensor: int, key_length: int, mlp: bool = True) -> dict:
  """One layer's widths per token (an attention block, and the MLP unless `mlp` is False)."""
  kv_split = tensor if dims.num_kv_heads % tensor == 0 else 1
  qkv = dims.num_heads * dims.head_dim / tensor + 2 * dims.num_kv_heads * dims.head_dim / kv_split
  widths = {"d": dims.d_model, "qkv": qkv, "scores": dims.num_heads * key_length / tensor}
  widths.update({f"mlp_{kind}": 0.0 for kind in set(MLP_KINDS.values())})
  if mlp:
    widths[f"mlp_{MLP_KINDS[dims.activation]}"] = dims.mlp_dim / tensor
  return widths


def _elements(coefficients: dict, widths: dict) -> float:
  return sum(coefficients[k] * widths[k] for k in coefficients)


def _stacks(cfg, dims) -> list[tuple[int, bool]]:
  """(layers, with cross-attention) of each stack the step runs."""
  if cfg.task == "translation":
    return [(dims.enc_layers, False), (dims.dec_layers, True)]
  if cfg.task == "classify" and dims.classifier_body == "encoder":
    return [(dims.enc_layers, False)]
  return [(dims.dec_layers, False)]


def activation_terms(cfg, dims, mesh_shape: dict) -> dict:
  """Per-device activation bytes of one microbatch, by term: `layers` (what the remat policy
  keeps of every layer until its backward), `working` (one layer's backward: its recomputed
  residuals and attention scores, [b, h, chunk, s] with model.attention_chunk), `loss` (the
  float32 logits [rows, chunk, vocab/tensor] and their gradient, one model.loss_chunk at a
  time). `dims` is the run's ModelDims (resolved remat and dtype, padded vocab)."""
  tensor = mesh_shape.get("tensor", 1)
  batch_shards = mesh_shape.get("stage", 1) * mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  rows = cfg.train.global_batch_size / batch_shards / cfg.train.microbatches
  length, itemsize = cfg.data.seq_len, dims.dtype.itemsize
  attention_chunk = _resolved_chunk(cfg.model.get("attention_chunk", 0), length)
  kept, working = KEPT_PER_LAYER[dims.remat], WORKING_SET[dims.remat]
  if attention_chunk < length:  # each query chunk is recomputed: no chunk's probabilities kept
    kept = {**kept, "scores": 0.0}
    working = {**working, "scores": working["scores"] * attention_chunk / length}
  layers = work = 0.0
  for count, cross in _stacks(cfg, dims):
    widths = _layer_widths(dims, tensor, length)
    per_layer, layer_work = _elements(kept, widths), _elements(working, widths)
    if cross:  # one more attention block, over the source (as long as the target here)
      block = _layer_widths(dims, tensor, length, mlp=False)
      per_layer, layer_work = (
        per_layer + _elements(kept, block),
        layer_work + _elements(working, block),
      )
    layers += count * per_layer
    work = max(work, layer_work)
  tokens = rows * length
  if cfg.task == "classify":
    loss_tokens, vocab = rows, dims.num_classes
  else:
    loss_tokens, vocab = (
      rows * _resolved_chunk(cfg.model.get("loss_chunk", 0), length),
      dims.vocab_size / tensor,
    )
  loss = 2 * loss_tokens * vocab * 4
  if cfg.task != "classify" and loss_tokens < tokens:
    # Chunked: the head's float32 gradient summed over the chunks beside one chunk's, and the
    # hidden states' gradient, which the forward keeps for the backward.
    loss += 2 * vocab * dims.d_model * 4 + tokens * dims.d_model * 4
  return {
    "layers": tokens * layers * itemsize,
    "working": tokens * work * itemsize,
    "loss": loss,
  }


def gradient_temp_bytes(cfg, state: dict, mesh_shape: dict) -> float:
  """The float32 gradients the backward holds: the accumulator in its stage's layout and, with
  several microbatches (or ZeRO-2's per-microbatch scatter), one microbatch's gradient beside
  it, whole before its reduce-scatter except under ZeRO-3 (reduce-scattered per layer)."""
  zero, k = cfg.zero_stage, cfg.train.microbatches
  local = state["grads"] * (mesh_shape["fsdp"] if zero == 2 else 1)  # one microbatch's, whole
  if zero == 2:
    return state["grads"] + local
  return state["grads"] + (local if k > 1 else 0.0)


def temp_terms(cfg, dims, mesh_shape: dict, state: dict, gathered: float = 0.0) -> dict:
  """The step's temporaries per device, by term, and `total`: the peak of two phases that do not
  overlap, the backward (gradients, the activations of activation_terms: the loss's logits
  live through it, its gradient or one layer's working set at a time; under ZeRO-3 the
  `gathered` bytes: the parameters outside the stacks whole, and a layer with its gradient)
  and the update (gradients and UPDATE_TEMPORARIES x the update layout's parameter bytes)."""
  terms = {"grads": gradient_temp_bytes(cfg, state, mesh_shape)}
  terms.update(activation_terms(cfg, dims, mesh_shape))
  terms["gathered"] = gathered
  terms["update"] = UPDATE_TEMPORARIES * state["opt_state"] / 2
  backward = (
    terms["grads"] + terms["layers"] + gathered + terms["loss"] / 2
    + max(terms["loss"] / 2, terms["working"])
  )  # fmt: skip
  terms["total"] = max(backward, state["grads"] + terms["update"])
  return terms


def gathered_bytes(cfg, dims, counts: dict, mesh_shape: dict) -> float:
  """ZeRO-3 on fsdp > 1: the parameters outside the stacks gathered whole for the microbatch
  (with their gradient) and one layer gathered in the scan (with its gradient), fp32 / tensor."""
  if not dims.params_sharded:
    return 0.0
  layers = sum(count for count, _ in _stacks(cfg, dims)) or 1
  top = counts["num_params"] - counts["in_stacks"]
  return 2 * 4 * (top + counts["in_stacks"] / layers) / mesh_shape["tensor"]


def state_counts(logical, abstract_params, trainable, stacked, mesh) -> dict:
  """Parameter counts formula_bytes needs, for one mesh (devices or an AbstractMesh): all,
  trainable, those fsdp cannot shard (whole), each pipeline stage's share of the stacks."""
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  unsharded = sharding.replicated_over_fsdp(logical, abstract_params, mesh)
  trained_paths = set(jax.tree.leaves(trees.param_paths(trees.select(abstract_params, trainable))))
  stages = mesh.shape["stage"]
  trained = trees.select(abstract_params, trainable)
  per_stage = lambda total, stack: total - stack + stack / stages
  n_params, n_trained = count(abstract_params), count(trained)
  in_stacks = count(trees.select(abstract_params, stacked))
  return {
    "num_params": per_stage(n_params, in_stacks),
    "in_stacks": in_stacks / stages,
    "trainable": per_stage(
      n_trained, count(trees.select(trained, trees.select(stacked, trainable)))
    ),
    "replicated": sum(math.prod(shape) for shape, _ in unsharded.values()),
    "replicated_trainable": sum(
      math.prod(s) for p, (s, _) in unsharded.items() if p in trained_paths
    ),
  }


def state_bytes(counts: dict, zero_stage: int, mesh_shape: dict) -> dict:
  """formula_bytes of state_counts' counts on a mesh."""
  return formula_bytes(
    counts["num_params"],
    zero_stage,
    mesh_shape["fsdp"],
    mesh_shape["tensor"],
    replicated=counts["replicated"],
    trainable=counts["trainable"],
    replicated_trainable=counts["replicated_trainable"],
  )


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: memory per device, dense bfloat16 peak, and the per-device link bandwidth
  (one direction) the collectives' bandwidth bytes are charged at. `slice_unit`: what a slice
  name counts per chip (v4-32: 32 TensorCores = 16 chips); 0 for GPUs (no slice names)."""

  name: str
  memory_bytes: float
  peak_flops: float
  link_bytes_per_second: float
  platform: str
  slice_unit: int = 0


GiB = 2**30
# Vendor figures: HBM, bfloat16 dense peak, ICI (TPU: per chip, all links) or NVLink (GPU: half
# the quoted bidirectional figure).
CHIPS = {
  "v4": Chip("TPU v4", 32 * GiB, 275e12, 300e9, "tpu", 2),
  "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 200e9, "tpu", 1),
  "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 600e9, "tpu", 2),
  "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 448e9, "tpu", 1),
  "a100-40gb": Chip("A100 40GB", 40 * GiB, 312e12, 300e9, "gpu"),
  "a100-80gb": Chip("A100 80GB", 80 * GiB, 312e12, 300e9, "gpu"),
  "h100": Chip("H100 80GB", 80 * GiB, 989e12, 450e9, "gpu"),
  "h200": Chip("H200", 141e9, 989e12, 450e9, "gpu"),
}
# Without --chip: a device of the given memory ranked with these (stated in the output).
GENERIC = Chip("device (no --chip: 100 TFLOP/s, 100 GB/s links assumed)", 0.0, 100e12, 100e9, "gpu")


def parse_bytes(text: str) -> float:
  """'16GB' (10^9), '16GiB' (2^30), '512MiB', or a plain number of bytes."""
  found = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
  if not found:
    raise ConfigError(f"--device_memory: {text!r} is not a size such as 16GB or 32GiB")
  value, unit = float(found.group(1)), (found.group(2) or "B").upper()
  powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
  powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
  return value * powers[unit]


def target(chip: str, devices: int, device_memory: str) -> tuple[Chip, int]:
  """(--chip with --device_memory over its memory, --devices or the slice name's chip count)."""
  name, _, size = chip.lower().partition("-") if chip else ("", "", "")
  if chip and chip.lower() in CHIPS:
    name, size = chip.lower(), ""
  if chip and name not in CHIPS:
    raise ConfigError(
      f"--chip: {chip!r} is unknown; choose one of {', '.join(CHIPS)} (TPU slices as v4-32, "
      "v5e-16) or give --device_memory"
    )
  spec = CHIPS[name] if chip else GENERIC
  if size:
    if not size.isdigit() or not spec.slice_unit or int(size) % spec.slice_unit:
      raise ConfigError(f"--chip: {chip!r} is not a slice name of {spec.name} (e.g. {name}-32)")
    count = int(size) // spec.slice_unit
    if devices and devices != count:
      raise ConfigError(f"--devices={devices}, but {chip} has {count} chips; drop --devices")
    devices = count
  if not devices:
    raise ConfigError("--devices: how many devices to plan for (or a slice name in --chip)")
  if device_memory:
    spec = dataclasses.replace(spec, memory_bytes=parse_bytes(device_memory))
  if not spec.memory_bytes:
    raise ConfigError("--plan needs --chip or --device_memory")
  return spec, devices


def recompute_flops(cfg, dims) -> float:
  """FLOPs the remat policy adds to a global step: `full` runs every layer's forward again
  (2 x its matmul parameters per token plus the score and value products), `save_dots` only
  the batched products (QK^T, PV: dots with batch dims are not saved), `none` nothing."""
  if dims.remat == "none":
    return 0.0
  d, hk = dims.d_model, dims.num_heads * dims.head_dim
  attention = d * (hk + 2 * dims.num_kv_heads * dims.head_dim) + hk * d
  mlp = dims.mlp_dim * d * (3 if dims.activation == "swiglu" else 2)
  tokens, length = cfg.train.global_batch_size * cfg.data.seq_len, cfg.data.seq_len
  total = 0.0
  for layers, cross in _stacks(cfg, dims):
    blocks = 2 if cross else 1
    scores = blocks * 4 * length * hk  # QK^T and PV, forward, per token
    matmuls = 2 * (blocks * attention + mlp) if dims.remat == "full" else 0
    total += layers * tokens * (scores + matmuls)
  return total


def communication_bytes(cfg, dims, mesh_shape: dict, state: dict) -> float:
  """Bandwidth bytes per device per step of the gradient and parameter collectives
  (docs/architecture.md's table) and tensor parallelism's activation all-reduces."""
  ring = lambda n: (n - 1) / n
  data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
  k, zero = cfg.train.microbatches, cfg.zero_stage
  reduce_itemsize = 2 if cfg.train.grad_reduce_dtype == "bfloat16" else 4
  grads = state["grads"] * (fsdp if zero >= 2 else 1) * reduce_itemsize / 4  # before fsdp
  params = state["params"] * (fsdp if zero == 3 else 1)
  over_data = 2 * grads / fsdp * ring(data)
  if zero == 0:
    total = 2 * grads * ring(data * fsdp)
  elif zero == 1:
    total = grads * ring(fsdp) + over_data + params * ring(fsdp)
  elif zero == 2:
    total = k * grads * ring(fsdp) + over_data + params * ring(fsdp)
  else:
    total = k * (2 * params + grads) * ring(fsdp) + over_data
  if tensor > 1:  # two all-reduces per block forward and two in the backward (+ recompute)
    rows = cfg.train.global_batch_size / (mesh_shape.get("stage", 1) * data * fsdp)
    activation = rows * cfg.data.seq_len * dims.d_model * dims.dtype.itemsize
    per_block = 4 + (2 if dims.remat == "full" else 0)
    blocks = sum(layers * (3 if cross else 2) for layers, cross in _stacks(cfg, dims))
    total += blocks * per_block * 2 * activation * ring(tensor)
  return total


@dataclasses.dataclass(frozen=True)
class Option:
  """One way to run the config on the target, with its predicted bytes, FLOPs and time."""

  cfg: object
  mesh_shape: dict
  remat: str
  state: dict  # formula_bytes
  temp: dict  # temp_terms
  batch_bytes: float
  flops_per_device: float
  communication_bytes: float
  seconds: float

  @property
  def total_bytes(self) -> float:
    """Arguments (params, optimizer state, batch; the outputs alias them) + temporaries."""
    return self.state["params"] + self.state["opt_state"] + self.batch_bytes + self.temp["total"]

  def label(self) -> str:
    c = self.cfg
    chunks = [
      f"{k}={c.model.get(k, 0)}" for k in ("attention_chunk", "loss_chunk") if c.model.get(k, 0)
    ]
    mesh = "x".join(str(self.mesh_shape[a]) for a in ("data", "fsdp", "tensor"))
    return " ".join(
      [f"mesh {mesh}", f"zero {c.zero_stage}", f"microbatches {c.train.microbatches}",
       f"remat {self.remat}", *chunks]
    )  # fmt: skip


def predict(cfg, dims, counts: dict, mesh_shape: dict, chip: Chip, model_flops: float) -> Option:
  """The formula's bytes per device, FLOPs per device (with recomputation) and the cost model's
  step time: FLOPs / peak + collective bandwidth bytes / link bandwidth, nothing overlapped."""
  state = state_bytes(counts, cfg.zero_stage, mesh_shape)
  devices = math.prod(mesh_shape.values())
  keys = 3 if cfg.task == "lm" else 5  # int32 [batch, seq_len] arrays of a packed batch
  batch = (
    keys * 4 * cfg.train.global_batch_size * cfg.data.seq_len / (devices / mesh_shape["tensor"])
  )
  flops = (model_flops + recompute_flops(cfg, dims)) / devices
  comm = communication_bytes(cfg, dims, mesh_shape, state)
  seconds = flops / chip.peak_flops + comm / chip.link_bytes_per_second
  temp = temp_terms(cfg, dims, mesh_shape, state, gathered_bytes(cfg, dims, counts, mesh_shape))
  return Option(cfg, mesh_shape, dims.remat, state, temp, batch, flops, comm, seconds)


def _divisors(n: int) -> list[int]:
  return [i for i in range(1, n + 1) if n % i == 0]


def candidates(cfg, devices: int):
  """Every (data x fsdp x tensor mesh, ZeRO stage, microbatches, remat, chunk sizes) variant of
  cfg on `devices` that passes the checks a run makes before it compiles (lm.config.validate,
  the mesh's divisibility checks on an abstract mesh of that shape); yields (cfg, mesh shape).
  ZeRO stages above 0 need fsdp > 1 (on fsdp 1 they are stage 0). No pipeline stages."""
  chunk_choices = {
    k: sorted({0, cfg.model[k]}) for k in ("attention_chunk", "loss_chunk") if cfg.model.get(k, 0)
  }
  for tensor in _divisors(devices):
    for fsdp in _divisors(devices // tensor):
      shape = {"stage": 1, "data": devices // tensor // fsdp, "fsdp": fsdp, "tensor": tensor}
      abstract = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))
      rows = cfg.train.global_batch_size // (shape["data"] * fsdp) or 1
      for zero in range(4) if fsdp > 1 else (0,):
        for k in _divisors(rows):
          for remat in ("none", "save_dots", "full"):
            for chunks in _chunk_settings(chunk_choices):
              c = cfg.copy_and_resolve_references()
              c.mesh.update(
                stage=1, dcn_stage=1, dcn_data=1, **{a: shape[a] for a in shape if a != "stage"}
              )
              c.zero_stage, c.train.microbatches, c.model.remat = zero, k, remat
              c.model.update(chunks)
              try:
                lmc.validate(c)
                lm_mesh.check_divisibility(c, abstract)
                lm_mesh.check_batch_divisibility(c, abstract)
              except ConfigError:
                continue
              yield c, shape


def _chunk_settings(choices: dict) -> list[dict]:
  settings = [{}]
  for key, values in choices.items():
    settings = [{**s, key: v} for s in settings for v in values]
  return settings


def layout_formula(layout, trainable) -> tuple[dict, dict, dict]:
  """(state counts, state bytes, temp terms) for a built lm.layout.Layout and its trainable
  mask: what experiments.bench prints beside the compiled step."""
  counts = state_counts(
    layout.logical, layout.abstract_params, trainable, layout.stacked(), layout.mesh
  )
  shape = dict(layout.mesh.shape)
  state = state_bytes(counts, layout.cfg.zero_stage, shape)
  gathered = gathered_bytes(layout.cfg, layout.dims, counts, shape)
  return counts, state, temp_terms(layout.cfg, layout.dims, shape, state, gathered)
