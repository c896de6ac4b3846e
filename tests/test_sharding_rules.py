"""Sharding rules as data: a snapshot of every parameter's PartitionSpec per ZeRO stage on
(2, 2, 2), and what ZeRO reports when a tensor has no dimension fsdp divides.

A change to the rules table or to `spec_for` shows up here as a diff of the golden file; to
accept it, run with ZEROLM_UPDATE_GOLDEN=1 and review the file's diff.
"""

import json
import os

import jax
import pytest

from lm.parallel import memory, report, sharding
from lm.train_step import Trainer
from lm.trees import param_count
from tests.helpers import tiny_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs_2x2x2.json")


def _specs(task: str) -> dict:
  out = {}
  for stage in range(4):
    cfg = tiny_config(task)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    cfg.zero_stage = stage
    run = Trainer.build(cfg, devices=jax.devices())
    kinds = {"params": run.layout.shardings.params, "grads": run.layout.shardings.grads}
    kinds["opt_state"] = run.layout.shardings.update
    rows = {}
    for kind, tree in kinds.items():
      for path, s in jax.tree_util.tree_leaves_with_path(tree):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        rows.setdefault(name, {})[kind] = str(tuple(s.spec))
    out[f"zero_stage={stage}"] = rows
  return out


def test_partition_specs_match_the_snapshot():
  current = {task: _specs(task) for task in ("translation", "lm")}
  if os.environ.get("ZEROLM_UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(current, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    golden = json.load(f)
  for task in golden:
    for stage in golden[task]:
      for name, spec in golden[task][stage].items():
        assert current[task][stage].get(name) == spec, (task, stage, name)
  assert current == golden


def test_zero3_on_2x2x2_shards_every_matrix_over_fsdp():
  stage3 = _specs("translation")["zero_stage=3"]
  for name, kinds in stage3.items():
    if "bias" not in name and "scale" not in name:
      assert "fsdp" in kinds["params"], (name, kinds)


@pytest.mark.parametrize("fsdp", [8, 2])
def test_tensors_zero_cannot_shard_are_reported_and_counted(fsdp):
  cfg = tiny_config(d_model=36, num_heads=4, mlp_dim=72)  # 36 and 9 (head dim) not divisible
  cfg.mesh.update(data=8 // fsdp, fsdp=fsdp, tensor=1)
  cfg.zero_stage = 3
  run = Trainer.build(cfg, devices=jax.devices())
  whole = sharding.replicated_over_fsdp(
    run.layout.logical, run.layout.abstract_params, run.layout.mesh
  )
  # Exactly the tensors that the stage-3 layout leaves without 'fsdp' in their spec.
  expected = {
    jax.tree_util.keystr(path, simple=True, separator="/")
    for path, s in jax.tree_util.tree_leaves_with_path(run.layout.shardings.params)
    if "fsdp" not in jax.tree.leaves(tuple(s.spec))
  }
  assert set(whole) == expected and bool(whole) == (fsdp == 8)  # 36 = 2 x 18: all shard on 2
  for name, (shape, nbytes) in whole.items():
    assert nbytes == 4 * int(jax.numpy.prod(jax.numpy.asarray(shape))), name
  # The bench's formula: sharded bytes over fsdp, plus the whole tensors on every device.
  kept = sum(int(jax.numpy.prod(jax.numpy.asarray(shape))) for shape, _ in whole.values())
  formula = memory.formula_bytes(param_count(run.layout.abstract_params), 3, fsdp, replicated=kept)
  measured = report.sharded_bytes(run.layout.abstract_params, run.layout.shardings.params)
  assert formula["params"] == measured
