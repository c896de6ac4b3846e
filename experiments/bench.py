"""Compiles the real train step and reports its time, FLOPs, memory and communication.

  python -m experiments.bench --config=experiments/speed.py --steps=10
  python -m experiments.bench --config=experiments/demo.py --host_devices=8 --sweep --json=b.json

Per device: bytes of params, optimizer state and gradients next to the formula in
docs/architecture.md (tensors ZeRO cannot shard counted whole);
`memory_analysis()` argument / output / temp bytes; collective bytes per step by kind from the
compiled HLO (ops in loops counted per iteration); compile seconds; step time; tokens/s; model
FLOPs per step (analytic and XLA's `cost_analysis()`); achieved FLOP/s over a matmul peak
measured in the same process. JSON keys are listed in the README.
jax and lm are imported inside the functions: --host_devices must set XLA_FLAGS before jax loads.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<module>.py[:variant]")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")
_SWEEP = flags.DEFINE_bool("sweep", False, "ZeRO stages 0-3 over the meshes in --meshes.")
_MESHES = flags.DEFINE_string("meshes", "1x8x1,2x4x1,2x2x2", "data x fsdp x tensor, for --sweep")
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


def bench_one(cfg, steps: int, peak: float) -> dict:
  import jax

  from lm import metrics
  from lm.data.synthetic import random_batch
  from lm.parallel import report, sharding
  from lm.train_step import Trainer
  from lm.trees import param_count, param_paths, select

  trainer = Trainer.build(cfg)
  run = trainer.layout
  n_params = param_count(run.abstract_params)
  unsharded = sharding.replicated_over_fsdp(run.logical, run.abstract_params, run.mesh)
  whole = sum(math.prod(shape) for shape, _ in unsharded.values())  # params ZeRO keeps whole
  trained_paths = set(jax.tree.leaves(param_paths(select(run.abstract_params, trainer.trainable))))
  trainable = param_count(select(run.abstract_params, trainer.trainable))
  whole_trainable = sum(math.prod(s) for p, (s, _) in unsharded.items() if p in trained_paths)
  fsdp = run.mesh.shape["fsdp"]
  start = time.perf_counter()
  compiled = trainer.compile_train_step()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  traffic = report.collective_traffic(compiled.as_text(), dict(run.mesh.shape))
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
  flops = metrics.model_flops(cfg, run.abstract_params)
  tokens = cfg.train.global_batch_size * cfg.data.seq_len * (1 if cfg.task == "lm" else 2)
  return {
    "mesh": dict(run.mesh.shape),
    "zero_stage": cfg.zero_stage,
    "microbatches": cfg.train.microbatches,
    "num_params": n_params,
    "trainable_params": trainable,
    "bytes_measured": measured,
    "bytes_formula": report.formula_bytes(
      n_params,
      cfg.zero_stage,
      fsdp,
      run.mesh.shape["tensor"],
      replicated=whole,
      trainable=trainable,
      replicated_trainable=whole_trainable,
    ),
    "replicated_over_fsdp": whole,
    "memory_analysis": {
      "argument": memory.argument_size_in_bytes,
      "output": memory.output_size_in_bytes,
      "temp": memory.temp_size_in_bytes,
      "alias": memory.alias_size_in_bytes,
    },
    "collectives": traffic,
    "gradient_bytes": 4 * trainable,
    "compile_seconds": compile_s,
    "step_seconds": step_s,
    "tokens_per_second": tokens / step_s,
    "model_flops_per_step": flops,
    "xla_flops_per_step": float(cost.get("flops", 0.0)) * run.mesh.size,
    "achieved_flops_per_second_per_device": flops / step_s / run.mesh.size,
    "matmul_peak_flops_per_second": peak,
    "fraction_of_peak": flops / step_s / run.mesh.size / peak,
  }


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


def print_table(results: list[dict]) -> None:
  print(
    "mesh(d,f,t) stage | params MB (formula) | opt MB (formula) | grads MB (formula) | "
    "arg MB | temp MB | all-reduce MB | all-gather MB | reduce-scatter MB | all-to-all MB | "
    "compile s | step s | tokens/s | frac peak"
  )
  for r in results:
    m, b, f, c = r["mesh"], r["bytes_measured"], r["bytes_formula"], r["collectives"]
    print(
      f"{m['data']},{m['fsdp']},{m['tensor']:<6} {r['zero_stage']:>3} |"
      f"{_mb(b['params'])} ({_mb(f['params'])}) |{_mb(b['opt_state'])} ({_mb(f['opt_state'])})"
      f" |{_mb(b['grads'])} ({_mb(f['grads'])}) |{_mb(r['memory_analysis']['argument'])} |"
      f"{_mb(r['memory_analysis']['temp'])} |"
      + " |".join(
        _mb(c[k]["bandwidth_bytes"])
        for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
      )
      + f" | {r['compile_seconds']:6.1f} | {r['step_seconds']:.3f} | "
      f"{r['tokens_per_second']:9.0f} | {r['fraction_of_peak']:.2f}"
    )


def main(argv):
  del argv
  if _HOST_DEVICES.value:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}"
    )
  from lm.config import ConfigError

  cfg = _CONFIG.value
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
    configs = [cfg]
    if _SWEEP.value:
      configs = []
      for mesh in _MESHES.value.split(","):
        data, fsdp, tensor = (int(x) for x in mesh.split("x"))
        for stage in range(4):
          c = cfg.copy_and_resolve_references()
          c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
          c.zero_stage = stage
          configs.append(c)
    results = []
    for c in configs:
      results.append(bench_one(c, _STEPS.value, peak))
      print_table(results[-1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\nsummary (MB per device; collectives as bandwidth bytes per device per step)")
  print_table(results)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
