"""One process of a multi-process run that tests/test_multihost.py starts several of.

A few train steps of a tiny model on mesh (2, 2, 2) under each ZeRO stage, from fixed global
batches (each process feeds only the rows its devices hold, through Layout.shard_batch), then a
batch of beam-search decodes with the last stage's parameters; process 0 writes the losses and
the step's data-axis reduction bytes per stage, per-tensor parameter norms and decodes as JSON.
With 2 processes the mesh is multi-slice (mesh.dcn_data=2): each process stands in for a slice,
so `data` crosses processes as it crosses DCN between slices.

  launch/local.sh 2 python tests/multihost_worker.py --output=OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.data.synthetic import random_batch
from lm.decode import DecodeOptions, Decoder
from lm.parallel import report
from lm.parallel.mesh import init_distributed
from lm.train_step import Trainer
from tests.helpers import tiny_config

STEPS = 3


def config(dcn_data: int = 1, zero_stage: int = 3, one_device: bool = False):
  cfg = tiny_config("translation", dropout_rate=0.1)  # dropout keys must not depend on P
  if not one_device:  # mesh.data counts replicas within a slice; the job has data * dcn_data
    cfg.mesh.update(data=2 // dcn_data, fsdp=2, tensor=2, dcn_data=dcn_data)
  cfg.zero_stage = zero_stage
  cfg.train.update(global_batch_size=16)
  cfg.data.pack = False
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6)
  return cfg


def pipeline_config(one_device: bool = False):
  """An LM on 2 pipeline stages across the processes (mesh.dcn_stage=2), fsdp and tensor within
  each, ZeRO-3 and dropout: what 2 processes must train like one device."""
  cfg = tiny_config("lm", dec_layers=4, dropout_rate=0.1)
  if not one_device:
    cfg.mesh.update(stage=1, dcn_stage=2, data=1, fsdp=2, tensor=2)
  cfg.zero_stage = 3
  cfg.train.update(global_batch_size=16, pipeline_microbatches=4)
  cfg.data.pack = False
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6)
  return cfg


def process_rows(sharding, shape) -> slice:
  """The contiguous rows of a [batch, ...] global array that this process's devices hold."""
  indices = sharding.addressable_devices_indices_map(shape).values()
  starts = [index[0].start or 0 for index in indices]
  stops = [shape[0] if index[0].stop is None else index[0].stop for index in indices]
  return slice(min(starts), max(stops))


def train(cfg, devices=None):
  run = Trainer.build(cfg, devices)
  state, step = run.init_state(), run.compile_train_step()
  shape = (cfg.train.global_batch_size, cfg.data.seq_len)
  rows = process_rows(run.layout.shardings.batch, shape)
  losses = []
  for seed in range(STEPS):
    batch = random_batch(cfg, seed, padding=3)
    state, metrics = step(state, run.layout.shard_batch({k: v[rows] for k, v in batch.items()}))
    losses.append(float(metrics["loss"]))
  return run, state, step, losses


def run_and_decode(dcn_data: int = 1, stages=(0, 1, 2, 3), one_device: bool = False) -> dict:
  losses, data_reduction_bytes = {}, {}
  for stage in stages:
    run, state, step, losses[str(stage)] = train(
      config(dcn_data, stage, one_device), jax.devices()[:1] if one_device else None
    )
    traffic = report.collective_traffic(step.as_text(), dict(run.layout.mesh.shape))
    data_reduction_bytes[str(stage)] = sum(  # stage 0 reduces over data+fsdp in one op
      size
      for kind in ("all-reduce", "reduce-scatter")
      for axes, size in traffic[kind]["by_axes"].items()
      if "data" in axes.split("+")
    )
  cfg = run.layout.cfg  # the last stage's
  rng = np.random.RandomState(0)
  norms = jax.jit(
    lambda p: jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x))), p),
    out_shardings=run.layout.shardings.replicated,
  )(state.params)
  sources = [list(rng.randint(4, cfg.model.vocab_size, size=n)) + [3] for n in (3, 9, 5, 12, 1)]
  decodes = {}
  for beam in (3,):  # beam search (greedy decoding under several processes: test_multihost)
    options = DecodeOptions(beam_size=beam, max_len=12, max_len_a=1.0, max_len_b=4)
    decoder = Decoder(
      run.layout, state.params, _VocabOnly(cfg.model.vocab_size), options, batch_size=8
    )
    decodes[str(beam)] = decoder.decode_ids(sources).tolist()
  data_processes = {d.process_index for d in run.layout.mesh.devices[0, :, 0, 0]}
  return {
    "process_count": jax.process_count(),
    # Each step's reduction over data, and how many processes the data axis spans.
    "data_reduction_bytes": data_reduction_bytes,
    "data_axis_processes": len(data_processes),
    "losses": losses,
    "norms": [float(x.addressable_data(0)) for x in jax.tree.leaves(norms)],
    "decodes": decodes,
  }


class _VocabOnly:
  """What Decoder.decode_ids asks of a tokenizer: its vocabulary size and special ids."""

  pad_id, bos_id, eos_id = 0, 2, 3  # zerolm's own

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--output", required=True)
  parser.add_argument("--distributed", action="store_true")  # the flags launch/local.sh adds
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--pipeline", action="store_true", help="2 stages over the processes")
  args = parser.parse_args()
  # A few steps of a tiny model: compiling dominates, so LLVM at -O0 (as in the test process).
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  init_distributed(args.coordinator_address, args.num_processes, args.process_id)
  if args.pipeline:
    run, _, step, losses = train(pipeline_config())
    stage_processes = {d.process_index for d in run.layout.mesh.devices[:, 0, 0, 0]}
    permutes = report.collective_traffic(step.as_text(), dict(run.layout.mesh.shape))
    result = {
      "losses": losses,
      "stage_processes": len(stage_processes),
      "permute_axes": sorted(permutes["collective-permute"]["by_axes"]),
    }
  else:
    result = run_and_decode(dcn_data=args.num_processes)
  if jax.process_index() == 0:
    with open(args.output, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
