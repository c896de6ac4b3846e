"""Compiles the real train step and reports its time, FLOPs, memory and communication.

  python -m experiments.bench --config=experiments/speed.py --steps=10
  python -m experiments.bench --config=experiments/demo.py --host_devices=8 --sweep --json=b.json

Pipeline parallelism: a 4-axis mesh entry is stage x data x fsdp x tensor; over each one with
stage > 1 the sweep runs every --pipeline_microbatches M x --pipeline_repeats R at the config's
zero_stage (3-axis entries, and stage 1, sweep ZeRO stages 0-3). The LM demo model (lm1b.py
shrunk; 8 decoder layers divide stage 4 x R 2):

  python -m experiments.bench --config=experiments/lm1b.py --host_devices=8 --sweep --steps=2 \
    --meshes=4x1x2x1 --pipeline_microbatches=4,8,16 --pipeline_repeats=1,2 \
    --config.model.dec_layers=8 --config.model.d_model=128 --config.model.num_heads=4 \
    --config.model.mlp_dim=512 --config.model.vocab_size=256 --config.data.seq_len=32 \
    --config.train.global_batch_size=64

Per device: bytes of params, optimizer state and gradients next to the formula in
docs/architecture.md (tensors ZeRO cannot shard counted whole);
`memory_analysis()` argument / output / temp bytes; collective bytes per step by kind from the
compiled HLO (ops in loops counted per iteration); compile seconds; step time; tokens/s; model
FLOPs per step (analytic and XLA's `cost_analysis()`); achieved FLOP/s over a matmul peak
measured in the same process; matmul FLOPs per device from the compiled HLO with loops counted
per iteration (`dot_flops_per_device`; cost_analysis counts a while body once). With pipeline
stages a second table (JSON key `pipeline`): S, M, R, the bubble (S-1)/(M*R+S-1),
collective-permute bytes per step beside 2 * (M*R+S-1) * one microbatch's activations per pass,
the layer stacks' param and optimizer-state bytes per device beside the same model's without
stages divided by S, temp bytes and dot FLOPs. JSON keys are listed in docs/parallelism.md.
Temp bytes are printed beside lm/parallel/memory.py's formula (JSON `temp_formula`).

--plan (experiments/plan.py): the options that fit a target, best first, without its devices;
--verify compiles the top one here:

  python -m experiments.bench --plan --config=experiments/wmt_ende.py:big --chip=v4-32 \
    --verify --host_devices=16
jax and lm are imported inside the functions: --host_devices must set XLA_FLAGS before jax loads.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<module>.py[:variant]")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")
_SWEEP = flags.DEFINE_bool(
  "sweep", False, "ZeRO stages 0-3 over the meshes in --meshes (stage > 1: M x R instead)."
)
_MESHES = flags.DEFINE_string(
  "meshes",
  "1x8x1,2x4x1,2x2x2",
  "For --sweep: data x fsdp x tensor, or stage x data x fsdp x tensor (pipeline stages).",
)
_PIPELINE_MICROBATCHES = flags.DEFINE_string(
  "pipeline_microbatches",
  "",
  "Comma list of train.pipeline_microbatches M swept on meshes with stage > 1 ('' = config's).",
)
_PIPELINE_REPEATS = flags.DEFINE_string(
  "pipeline_repeats",
  "",
  "Comma list of model.pipeline_repeats R swept on meshes with stage > 1 ('' = config's).",
)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "Simulate this many CPU devices.")
_PIPELINE = flags.DEFINE_integer(
  "pipeline", 0, "Instead of the step: time this many batches of the config's input pipeline."
)
_DECODE = flags.DEFINE_string(
  "decode",
  None,
  "Instead of the step: decode --sentences demo-language sources of 1-6 sentences each with this "
  "workdir's latest checkpoint (its decode settings); sentences/s and XLA compiles, twice.",
)
_SENTENCES = flags.DEFINE_integer("sentences", 1000, "With --decode: how many inputs.")
_MOCK_TFDS = flags.DEFINE_integer(
  "mock_tfds", 0, "With --pipeline: feed tfds sources from tfds.testing.mock_data (N examples)."
)

_PLAN = flags.DEFINE_bool(
  "plan",
  False,
  "Instead of the step: the meshes, ZeRO stages, microbatches and remat policies that fit the "
  "target (--chip, --devices, --device_memory), best first, from lm/parallel/memory.py.",
)
_CHIP = flags.DEFINE_string(
  "chip", "", "With --plan: v4, v5e, v5p, v6e (or a slice: v4-32), h100, ..."
)
_DEVICES = flags.DEFINE_integer("devices", 0, "With --plan: devices (a slice name implies them).")
_DEVICE_MEMORY = flags.DEFINE_string(
  "device_memory", "", "With --plan: bytes per device (16GB, 32GiB), over the chip's."
)
_HEADROOM = flags.DEFINE_float(
  "headroom", 0.1, "With --plan: the fraction of device memory kept free (fragmentation, XLA)."
)
_TOP = flags.DEFINE_integer("top", 10, "With --plan: how many options to print.")
_VERIFY = flags.DEFINE_bool(
  "verify",
  False,
  "With --plan: compile the top option abstractly on this process's devices (--host_devices "
  "on CPU) and print predicted vs compiled bytes.",
)

AXES3 = ("data", "fsdp", "tensor")  # a 3-axis --meshes entry; 4-axis entries lead with stage


def bench_one(cfg, steps: int, peak: float) -> dict:
  import jax

  from lm import metrics
  from lm.data.synthetic import random_batch
  from lm.parallel import memory, report
  from lm.train_step import Trainer
  from lm.trees import param_count, select

  trainer = Trainer.build(cfg)
  run = trainer.layout
  n_params = param_count(run.abstract_params)
  trainable = param_count(select(run.abstract_params, trainer.trainable))
  # Each pipeline stage holds 1/stage of the layer stacks: the formula's parameter counts.
  counts, formula, temp_formula = memory.layout_formula(run, trainer.trainable)
  start = time.perf_counter()
  compiled = trainer.compile_train_step()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = compiled.as_text()
  traffic = report.collective_traffic(hlo, dict(run.mesh.shape))
  abstract = trainer.abstract_state()
  measured = {
    "params": report.sharded_bytes(abstract.params, run.shardings.params),
    "grads": report.sharded_bytes(
      select(run.abstract_params, trainer.trainable), select(run.shardings.grads, trainer.trainable)
    ),
    "opt_state": report.sharded_bytes(abstract.opt_state, trainer.state_shardings.opt_state),
  }
  state = trainer.init_state()
  # One example filling each row; packed configs get its segment ids and positions.
  batch = run.shard_batch(random_batch(cfg, packed=cfg.data.pack))
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  # The allocator's high-water mark where the platform keeps one (GPU, TPU; not CPU).
  stats = jax.local_devices()[0].memory_stats() or {}
  flops = metrics.model_flops(cfg, run.abstract_params)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len * (1 if cfg.task == "lm" else 2)
  result = {
    "mesh": dict(run.mesh.shape),
    "zero_stage": cfg.zero_stage,
    "microbatches": cfg.train.microbatches,
    "num_params": n_params,
    "trainable_params": trainable,
    "bytes_measured": measured,
    "bytes_formula": formula,
    "replicated_over_fsdp": counts["replicated"],
    "temp_formula": temp_formula,
    "memory_analysis": {
      "argument": analysis.argument_size_in_bytes,
      "output": analysis.output_size_in_bytes,
      "temp": analysis.temp_size_in_bytes,
      "alias": analysis.alias_size_in_bytes,
    },
    "collectives": traffic,
    "gradient_bytes": 4 * trainable,
    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    "compile_seconds": compile_s,
    "step_seconds": step_s,
    "tokens_per_second": tokens / step_s,
    "model_flops_per_step": flops,
    "xla_flops_per_step": float(cost.get("flops", 0.0)) * run.mesh.size,
    "dot_flops_per_device": report.dot_flops(hlo),
    "achieved_flops_per_second_per_device": flops / step_s / run.mesh.size,
    "matmul_peak_flops_per_second": peak,
    "fraction_of_peak": flops / step_s / run.mesh.size / peak,
  }
  if run.dims.pipeline:
    result["pipeline"] = pipeline_figures(trainer, traffic)
  return result


def pipeline_figures(trainer, traffic: dict) -> dict:
  """A pipelined run's schedule, stage-to-stage traffic and layer-stack bytes, each measured
  figure beside its theory. Builds (compiles nothing) the same model with its stages folded
  into data for the stack bytes' formula."""
  from lm.parallel import pipeline as pp
  from lm.train_step import Trainer

  run = trainer.layout
  cfg, sched, shape = run.cfg, run.dims.pipeline, run.mesh.shape
  # One pipeline microbatch: a (data, fsdp) group's rows of one train.microbatches pass, / M.
  rows = cfg.train.global_batch_size // (shape["data"] * shape["fsdp"] * cfg.train.microbatches)
  activation = (
    rows // sched.microbatches * cfg.data.seq_len * run.dims.d_model * run.dims.dtype.itemsize
  )
  flat = stack_bytes(Trainer.for_layout(run.unpipelined()))
  return {
    "stages": sched.stages,
    "microbatches": sched.microbatches,
    "repeats": sched.repeats,
    "gather": sched.gather,
    "iterations": sched.iterations,
    "bubble_fraction": sched.bubble_fraction,
    "activation_bytes": activation,
    "permute_bytes_measured": traffic["collective-permute"]["bandwidth_bytes"],
    "permute_bytes_theory": pp.permute_bytes(sched, activation) * cfg.train.microbatches,
    "stack_bytes_measured": stack_bytes(trainer),
    "stack_bytes_formula": {k: v / sched.stages for k, v in flat.items()},
    "stack_bytes_unpipelined": flat,
  }


def stack_bytes(trainer) -> dict:
  """Per-device bytes of the layer stacks' parameters (top-level entries with a leading
  'layers' axis) and of their optimizer state."""
  import jax
  import optax

  from lm.parallel import report
  from lm.trees import select

  run = trainer.layout
  stacked = run.stacked()
  stacks = [k for k, v in stacked.items() if any(jax.tree.leaves(v))]
  abstract = trainer.abstract_state()
  params = report.sharded_bytes(
    [abstract.params[k] for k in stacks], [run.shardings.params[k] for k in stacks]
  )
  tx = trainer.local_sgd.outer_tx if trainer.local_sgd else trainer.tx
  is_stack = optax.tree_map_params(
    tx,
    lambda _, stack: stack,
    abstract.opt_state,
    select(stacked, trainer.trainable),
    transform_non_params=lambda _: False,
  )
  kept = [
    (leaf, sharding)
    for leaf, sharding, keep in zip(
      jax.tree.leaves(abstract.opt_state),
      jax.tree.leaves(trainer.state_shardings.opt_state),
      jax.tree.leaves(is_stack),
      strict=True,
    )
    if keep
  ]
  opt_state = report.sharded_bytes([leaf for leaf, _ in kept], [s for _, s in kept])
  return {"params": params, "opt_state": opt_state}


def pipeline_throughput(cfg, batches: int) -> dict:
  """Tokens/s of the input pipeline alone (this process's share), after its first batch."""
  import tempfile

  from lm.data import pipeline

  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    data = pipeline.load(cfg, workdir)
    load_s = time.perf_counter() - start
    iterator = pipeline.TrainIterator(data)
    start = time.perf_counter()
    next(iterator)
    first_s = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
      tokens += sum(
        int((batch[k + "_segment_ids"] > 0).sum()) for k in ("inputs", "targets") if k in batch
      )
    seconds = time.perf_counter() - start
  return {
    "load_seconds": load_s,
    "first_batch_seconds": first_s,
    "batches_per_second": batches / seconds,
    "tokens_per_second": tokens / seconds,
    "padding_fraction": 1
    - tokens
    / (
      batches * len(batch["targets"]) * cfg.data.seq_len * (2 if cfg.task == "translation" else 1)
    ),
  }


def decode_throughput(workdir: str, count: int) -> dict:
  """Sentences/s and backend compiles of the Decoder on `count` inputs of varied length; the
  second pass shows the steady state (every shape compiled)."""
  import random

  from lm import metrics
  from lm.data import synthetic
  from lm.decode import Decoder

  decoder = Decoder.from_workdir(workdir)
  rng, pairs = random.Random(7), synthetic.DemoSource(10_000, 99)
  lines = [
    " ".join(pairs[rng.randrange(10_000)][0] for _ in range(rng.randint(1, 6)))
    for _ in range(count)
  ]
  lengths = [len(decoder.tokenizer.encode(line, "inputs")) for line in lines]
  result = {"sentences": count, "tokens_min": min(lengths), "tokens_max": max(lengths)}
  result["beam_size"] = decoder.options.beam_size
  for name in ("first", "second"):
    with metrics.counting_compiles() as compiles:
      start = time.perf_counter()
      decoder(lines, warn=lambda _: None)
      seconds = time.perf_counter() - start
    result[name] = {
      "seconds": seconds,
      "sentences_per_second": count / seconds,
      "compiles": len(compiles),
    }
  result["shapes"] = decoder.shapes
  return result


def _mb(x: float) -> str:
  return f"{x / 2**20:8.2f}"


def _mesh_label(mesh: dict) -> str:
  """d,f,t; s,d,f,t with pipeline stages."""
  axes = ("stage", "data", "fsdp", "tensor") if mesh.get("stage", 1) > 1 else AXES3
  return ",".join(str(mesh[a]) for a in axes)


def print_table(results: list[dict]) -> None:
  print(
    "mesh([s,]d,f,t) zero | params MB (formula) | opt MB (formula) | grads MB (formula) | "
    "arg MB | temp MB (formula) | all-reduce MB | all-gather MB | reduce-scatter MB | "
    "all-to-all MB | compile s | step s | tokens/s | frac peak | dot GFLOP/dev"
  )
  for r in results:
    m, b, f, c = r["mesh"], r["bytes_measured"], r["bytes_formula"], r["collectives"]
    print(
      f"{_mesh_label(m):<15} {r['zero_stage']:>4} |"
      f"{_mb(b['params'])} ({_mb(f['params'])}) |{_mb(b['opt_state'])} ({_mb(f['opt_state'])})"
      f" |{_mb(b['grads'])} ({_mb(f['grads'])}) |{_mb(r['memory_analysis']['argument'])} |"
      f"{_mb(r['memory_analysis']['temp'])} ({_mb(r['temp_formula']['total'])}) |"
      + " |".join(
        _mb(c[k]["bandwidth_bytes"])
        for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
      )
      + f" | {r['compile_seconds']:6.1f} | {r['step_seconds']:.3f} | "
      f"{r['tokens_per_second']:9.0f} | {r['fraction_of_peak']:.2f} | "
      f"{r['dot_flops_per_device'] / 1e9:8.2f}"
    )


def print_pipeline_table(results: list[dict]) -> None:
  """The results with pipeline stages: measured figures with their theory in brackets."""
  piped = [r for r in results if "pipeline" in r]
  if not piped:
    return
  print(
    "mesh(s,d,f,t) zero |  S |  M |  R | bubble | permute MB (theory) | "
    "stack params MB (unpiped/S) | stack opt MB (unpiped/S) | temp MB | dot GFLOP/dev | step s"
  )
  for r in piped:
    p = r["pipeline"]
    b, f = p["stack_bytes_measured"], p["stack_bytes_formula"]
    print(
      f"{_mesh_label(r['mesh']):<13} {r['zero_stage']:>4} | {p['stages']:>2} |"
      f" {p['microbatches']:>2} | {p['repeats']:>2} | {p['bubble_fraction']:6.3f} |"
      f"{_mb(p['permute_bytes_measured'])} ({_mb(p['permute_bytes_theory'])}) |"
      f"   {_mb(b['params'])} ({_mb(f['params'])})  |"
      f"{_mb(b['opt_state'])} ({_mb(f['opt_state'])}) |"
      f"{_mb(r['memory_analysis']['temp'])} | {r['dot_flops_per_device'] / 1e9:13.2f} |"
      f" {r['step_seconds']:.3f}"
    )


def parse_mesh(entry: str) -> dict:
  """'DxFxT' or 'SxDxFxT' -> {stage, data, fsdp, tensor}."""
  try:
    sizes = [int(x) for x in entry.split("x")]
  except ValueError:
    sizes = []
  if len(sizes) not in (3, 4) or min(sizes) < 1:
    raise app.UsageError(
      f"--meshes: {entry!r} is neither data x fsdp x tensor nor stage x data x fsdp x tensor "
      "(positive integers, e.g. 2x2x2 or 2x1x2x2)"
    )
  return dict(zip(("stage", *AXES3), [1] * (4 - len(sizes)) + sizes, strict=True))


def _int_list(flag) -> list[int]:
  try:
    return [int(x) for x in flag.value.split(",") if x.strip()]
  except ValueError:
    raise app.UsageError(f"--{flag.name}: {flag.value!r} is not a comma list of integers") from None


def bench_configs(cfg, sweep: bool, meshes: str, microbatches: list, repeats: list) -> list:
  """The configs to bench. --sweep: per mesh entry ZeRO stages 0-3, or with stage > 1 the
  config's zero_stage; every config with stage > 1 then once per M x R (empty: config's)."""
  bases = [cfg]
  if sweep:
    bases = []
    for entry in meshes.split(","):
      mesh = parse_mesh(entry)
      for zero in range(4) if mesh["stage"] == 1 else (cfg.zero_stage,):
        c = cfg.copy_and_resolve_references()
        c.mesh.update(**mesh)
        c.zero_stage = zero
        bases.append(c)
  configs = []
  for base in bases:
    if base.mesh.stage * base.mesh.dcn_stage == 1:
      configs.append(base)
      continue
    for m in microbatches or (base.train.pipeline_microbatches,):
      for r in repeats or (base.model.pipeline_repeats,):
        c = base.copy_and_resolve_references()
        c.train.pipeline_microbatches = m
        c.model.pipeline_repeats = r
        configs.append(c)
  return configs


def run_plan(cfg) -> dict:
  """--plan: the fitting options, best first; with --verify the top one compiled here."""
  from experiments import plan
  from lm.config import ConfigError
  from lm.parallel import memory

  chip, devices = memory.target(_CHIP.value, _DEVICES.value, _DEVICE_MEMORY.value)
  options, valid = plan.plan(cfg, chip, devices, _HEADROOM.value)
  plan.print_plan(options, valid, chip, devices, _HEADROOM.value, _TOP.value)
  result = {"chip": chip.name, "devices": devices, "options": [plan.as_json(o) for o in options]}
  if _VERIFY.value:
    import jax

    if len(jax.devices()) < devices:
      raise ConfigError(
        f"--verify: the top option needs {devices} devices, this process has "
        f"{len(jax.devices())}; pass --host_devices={devices} on CPU"
      )
    checked = plan.verify(options[0])
    result["verify"] = checked
    print(
      f"verify (top option compiled on {devices} {checked['platform']} devices; predicted for "
      f"that platform's dtype): predicted {checked['predicted_bytes'] / 2**20:.1f} MiB per device"
      f" (temp {checked['predicted_temp'] / 2**20:.1f}), compiled "
      f"{checked['compiled_bytes'] / 2**20:.1f} MiB (arguments "
      f"{checked['compiled_argument'] / 2**20:.1f} + temp {checked['compiled_temp'] / 2**20:.1f})"
      f": ratio {checked['ratio']:.3f}"
    )
  return result


def main(argv):
  del argv
  if _HOST_DEVICES.value:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}"
    )
  from lm.config import ConfigError

  cfg = _CONFIG.value
  if _PLAN.value:
    try:
      result = run_plan(cfg)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(result, f, indent=2)
    return
  if _DECODE.value:
    print(json.dumps(decode_throughput(_DECODE.value, _SENTENCES.value), indent=2))
    return
  if _PIPELINE.value:
    import contextlib

    import tensorflow_datasets as tfds

    mock = tfds.testing.mock_data(num_examples=_MOCK_TFDS.value) if _MOCK_TFDS.value else None
    with mock or contextlib.nullcontext():
      result = pipeline_throughput(cfg, _PIPELINE.value)
    print(json.dumps(result, indent=2))
    return
  try:
    from lm import metrics

    peak = metrics.matmul_peak_flops(2048, 10)
    print(f"matmul peak (float32, one device): {peak / 1e9:.1f} GFLOP/s")
    configs = bench_configs(
      cfg,
      _SWEEP.value,
      _MESHES.value,
      _int_list(_PIPELINE_MICROBATCHES),
      _int_list(_PIPELINE_REPEATS),
    )
    results = []
    for c in configs:
      results.append(bench_one(c, _STEPS.value, peak))
      print_table(results[-1:])
      print_pipeline_table(results[-1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\nsummary (MB per device; collectives as bandwidth bytes per device per step)")
  print_table(results)
  if any("pipeline" in r for r in results):
    print("\npipeline stages (MB per device; theory or formula in brackets)")
    print_pipeline_table(results)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
