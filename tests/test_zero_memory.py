"""Per-device bytes of each kind of state follow the ZeRO accounting, read from real shards."""

import jax
import numpy as np
import pytest

from lm.parallel import memory, report
from lm.train_step import Trainer
from lm.trees import param_count, select
from tests.helpers import tiny_config


def _run(mesh, stage, microbatches=1, **model):
  cfg = tiny_config("translation", d_model=64, mlp_dim=256, **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.train.update(global_batch_size=8 * microbatches, microbatches=microbatches)
  return Trainer.build(cfg, devices=jax.devices())


def _state_bytes(run):
  state = run.init_state()
  arrays = lambda tree: [x for x in jax.tree.leaves(tree) if x.ndim > 0]
  return report.shard_bytes(arrays(state.params)), report.shard_bytes(arrays(state.opt_state))


@pytest.mark.parametrize("adaptation", [{}, dict(lora_rank=8)])
def test_state_bytes_per_device_match_formula_on_fsdp_mesh(adaptation):
  """Full training, and LoRA, whose optimizer state covers its factors alone (adapters are
  selected the same way)."""
  for stage in range(4):
    run = _run((1, 8, 1), stage, **adaptation)
    psi = param_count(run.layout.abstract_params)
    trainable = param_count(select(run.layout.abstract_params, run.trainable))
    assert (trainable == psi) == (not adaptation)
    params, opt = _state_bytes(run)
    formula = memory.formula_bytes(psi, stage, fsdp=8, trainable=trainable)
    assert params == formula["params"], (stage, params, formula)
    assert opt == formula["opt_state"], (stage, opt, formula)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stages_divide_state_by_fsdp_on_mixed_mesh(stage):
  base_params, base_opt = _state_bytes(_run((2, 2, 2), 0))
  params, opt = _state_bytes(_run((2, 2, 2), stage))
  assert opt * 2 == base_opt
  assert params * (2 if stage == 3 else 1) == base_params


@pytest.mark.parametrize("stage", range(4))
def test_gradients_sharded_only_from_stage_2(stage):
  run = _run((1, 8, 1), stage)
  specs = [s.spec for s in jax.tree.leaves(run.layout.shardings.grads)]
  sharded = ["fsdp" in tuple(spec) for spec in specs]
  assert all(sharded) if stage >= 2 else not any(sharded)


def test_zero2_temp_is_lower_than_zero1_by_the_gradient_shards():
  temps = {}
  for stage in (1, 2):
    run = _run((1, 8, 1), stage, microbatches=4)
    temps[stage] = run.compile_train_step().memory_analysis().temp_size_in_bytes
  gradient_bytes = 4 * param_count(run.layout.abstract_params)
  # Stage 1 keeps a whole float32 accumulator per device, stage 2 its 1/8 shard (each still
  # holds one microbatch's whole gradient before its reduce-scatter).
  saved = gradient_bytes * (1 - 1 / 8)
  assert abs((temps[1] - temps[2]) - saved) <= 0.05 * saved, temps


def test_collective_report_counts_loop_iterations():
  # Stage 3 gathers every layer inside the scans twice per microbatch (forward, and again in
  # the rematerialized backward), and the embedding table once per step.
  run = _run((1, 8, 1), 3, microbatches=2)
  traffic = report.collective_traffic(
    run.compile_train_step().as_text(), dict(run.layout.mesh.shape)
  )
  gathered = traffic["all-gather"]["bytes"]

  def nbytes(tree):
    return 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  params = run.layout.abstract_params
  expected = 2 * 2 * nbytes([params["encoder"], params["decoder"]]) + nbytes(params["embed"])
  assert abs(gathered - expected) <= 0.01 * expected, (gathered, expected)
