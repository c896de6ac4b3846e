"""Local SGD / DiLoCo (train.sync_every): replicas along data train apart, then merge."""

import json

import httpx
import jax
import numpy as np

from lm import checkpoint, evaluate, inference
from lm import train as lm_train
from lm.data.synthetic import random_batch
from lm.decode import Decoder
from lm.parallel import report
from lm.train_step import Trainer
from tests.helpers import tiny_config
from tests.test_checkpoint import _config, _final_params, _losses, _sigterm_when
from tests.test_serve import _server


def _tiny(mesh=(2, 4, 1), stage=1, **train):
  cfg = tiny_config("translation")
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.train.update(global_batch_size=16, **train)
  cfg.data.pack = False
  return cfg


def _train(cfg, steps):
  run = Trainer.build(cfg, devices=jax.devices())
  state, step = run.init_state(), run.compile_train_step()
  sync = run.compile_sync_step() if run.replica_count else None
  losses = []
  for t in range(1, steps + 1):
    state, metrics = step(state, run.layout.shard_batch(random_batch(cfg, seed=t, padding=3)))
    if sync and t % cfg.train.sync_every == 0:
      state = sync(state)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_sync_every_step_with_averaging_equals_synchronous_training():
  # Equal for a linear inner optimizer: the token-weighted average of the replicas' SGD steps
  # is the SGD step on the whole batch's mean gradient. (Adam's update is not linear in the
  # gradient, so there the two are different algorithms.) Rows carry unequal padding, so the
  # replicas' token counts differ and the weighting matters.
  for stage in (3,):  # replicas sharded within their fsdp group: the most involved layout
    optim = dict(name="sgd", learning_rate=0.5, clip_norm=0.0, weight_decay=0.0)
    sync_cfg, local_cfg = _tiny(stage=stage), _tiny(stage=stage, sync_every=1)
    sync_cfg.optim.update(optim)
    local_cfg.optim.update(optim)
    sync_losses, sync_params = _train(sync_cfg, 4)
    local_losses, local_params = _train(local_cfg, 4)
    np.testing.assert_allclose(local_losses, sync_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(local_params), jax.tree.leaves(sync_params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _data_axis_bytes(compiled, run) -> float:
  traffic = report.collective_traffic(compiled.as_text(), dict(run.layout.mesh.shape))
  return sum(
    b for t in traffic.values() for axes, b in t["by_axes"].items() if "data" in axes.split("+")
  )


def test_sync_every_4_cuts_data_axis_traffic_by_4():
  sync_run = Trainer.build(_tiny(), devices=jax.devices())
  synchronous = _data_axis_bytes(sync_run.compile_train_step(), sync_run)
  run = Trainer.build(_tiny(sync_every=4, outer_optimizer="nesterov"), devices=jax.devices())
  inner = _data_axis_bytes(run.compile_train_step(), run)
  merge = _data_axis_bytes(run.compile_sync_step(), run)
  assert inner < 1024, inner  # scalars only: the step's loss and token sums
  per_step = inner + merge / 4
  assert abs(per_step - synchronous / 4) <= 0.02 * synchronous / 4, (synchronous, inner, merge)


def test_sigterm_mid_period_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
  def cfg():
    c = _config(total_steps=12, zero_stage=1)
    c.mesh.update(data=2, fsdp=4, tensor=1)
    c.train.update(sync_every=5, outer_optimizer="nesterov")
    return c

  full = tmp_path / "full"
  lm_train.train(cfg(), str(full))
  _, full_params = _final_params(full, cfg())

  stopped_dir = tmp_path / "stopped"
  watcher = _sigterm_when(str(stopped_dir), 6)
  stopped = lm_train.train(cfg(), str(stopped_dir))["stopped_at"]
  watcher.join()
  assert stopped % 5 and stopped < 12, stopped  # inside a period: replicas apart, not merged
  restored = checkpoint.Checkpointer(str(stopped_dir))
  assert restored.latest_step() == stopped
  restored.close()
  lm_train.train(cfg(), str(stopped_dir))
  losses, full_losses = _losses(stopped_dir), _losses(full)
  assert [losses[s] for s in range(stopped + 1, 13)] == [
    full_losses[s] for s in range(stopped + 1, 13)
  ]
  step, params = _final_params(stopped_dir, cfg())
  assert step == 12
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_params)):
    np.testing.assert_array_equal(a, b)


def test_a_local_sgd_checkpoint_exports_evaluates_decodes_serves_and_initializes_on_data_1(
  tmp_path,
):
  """A local-SGD run (data 2) keeps per-replica state with a leading [data] axis; every
  inference mode reads the consensus parameters alone, on any data size."""
  cfg = _config(total_steps=4, zero_stage=1)
  cfg.mesh.update(data=2, fsdp=4)
  cfg.train.update(sync_every=2, outer_optimizer="nesterov")
  workdir = tmp_path / "local"
  lm_train.train(cfg, str(workdir))
  _, consensus = _final_params(workdir, cfg)  # the whole train state, on its own mesh

  one = jax.devices()[:1]
  layout, params, tokenizer, step = inference.restore_latest(str(workdir), devices=one)
  assert step == 4 and dict(layout.mesh.shape) == {"stage": 1, "data": 1, "fsdp": 1, "tensor": 1}
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(consensus)):
    np.testing.assert_array_equal(a, b)

  inference.export(str(workdir), str(tmp_path / "export"))
  exported = inference.restore_export(str(tmp_path / "export"), devices=one)[1]
  for a, b in zip(jax.tree.leaves(jax.device_get(exported)), jax.tree.leaves(consensus)):
    np.testing.assert_array_equal(a, b)

  results = evaluate.evaluate_workdir(str(workdir))
  assert results["step"] == 4 and np.isfinite(results["eval_loss"])

  lines = ["the cat sees a dog", "a bird"]
  decoded = Decoder.from_workdir(str(workdir), devices=one)(lines)  # 4 steps: maybe empty
  assert len(decoded) == 2
  with _server(f"--workdir={workdir}") as (_, url):
    served = httpx.post(f"{url}/v1/translate", json={"text": lines}, timeout=120)
  assert served.status_code == 200 and served.json()["translations"] == decoded

  start = _config(total_steps=1)  # data 1, fsdp 8
  start.train.init_from = str(workdir)
  lm_train.train(start, str(tmp_path / "init"))
  at_start = next(m for m in _metrics(tmp_path / "init") if m["step"] == 0)
  np.testing.assert_allclose(at_start["eval_loss"], results["eval_loss"], rtol=1e-5)


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]
