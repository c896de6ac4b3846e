"""Pipeline parallelism (mesh.stage > 1) trains like one device, at its theoretical cost."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from lm import config as lmc
from lm import inference, objective
from lm import train as lm_train
from lm.config import ConfigError
from lm.data import synthetic
from lm.data.synthetic import random_batch
from lm.decode import DecodeOptions, Decoder
from lm.layout import Layout, _stacks
from lm.parallel import pipeline as pp
from lm.parallel import report
from lm.train_step import Trainer
from tests.helpers import tiny_config

STEPS = 5


def _config(
  stage=1,
  data=1,
  fsdp=1,
  tensor=1,
  zero=0,
  m=0,
  repeats=1,
  layers=4,
  k=1,
  dropout=0.0,
  remat="auto",
  **train,
):
  cfg = tiny_config(
    "lm", dec_layers=layers, pipeline_repeats=repeats, dropout_rate=dropout, remat=remat
  )
  cfg.mesh.update(stage=stage, data=data, fsdp=fsdp, tensor=tensor)
  cfg.zero_stage = zero
  cfg.train.update(global_batch_size=32, microbatches=k, pipeline_microbatches=m, **train)
  cfg.data.pack = False  # the batches below are plain rows
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6, weight_decay=0.1, clip_norm=1.0)
  return cfg


def _devices(cfg):
  return jax.devices()[: math.prod(cfg.mesh[a] for a in ("stage", "data", "fsdp", "tensor"))]


def _train(cfg):
  run = Trainer.build(cfg, devices=_devices(cfg))
  state, step = run.init_state(), run.compile_train_step()
  losses = []
  for seed in range(STEPS):
    state, metrics = step(state, run.layout.shard_batch(random_batch(cfg, seed=seed, padding=2)))
    losses.append(float(metrics["loss"]))
    assert bool(metrics["finite"])
  # Compared in layer order: a circular pipeline holds its stacks in stage order.
  params = jax.device_get(run.layout.to_layer_order(state.params))
  return losses, params


@functools.cache
def _reference(layers=4, k=1, dropout=0.0):
  return _train(_config(layers=layers, k=k, dropout=dropout))


def _assert_like_one_device(cfg):
  losses, params = _train(cfg)
  m = cfg.model
  ref_losses, ref_params = _reference(m.dec_layers, cfg.train.microbatches, m.dropout_rate)
  if m.dropout_rate:  # the masks matter: without them the losses are others
    assert not np.allclose(ref_losses, _reference(m.dec_layers, cfg.train.microbatches)[0])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  norms = [np.linalg.norm(x) for x in jax.tree.leaves(params)]
  np.testing.assert_allclose(
    norms, [np.linalg.norm(x) for x in jax.tree.leaves(ref_params)], rtol=1e-5
  )
  # Each tensor to its scale, plus 0.5% of one Adam step (as tests/test_parallel.py).
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 5e-6


SCHEDULES = [
  dict(stage=2, m=2),
  dict(stage=2, m=4),
  dict(stage=4, m=4),
  dict(stage=4, m=8),
  dict(stage=2, m=2, repeats=2),
  dict(stage=2, m=4, repeats=2, dropout=0.1),
  dict(stage=2, fsdp=2, zero=3, m=2, repeats=2, pipeline_gather="iteration"),
]


@pytest.mark.parametrize(
  "options", SCHEDULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_schedules_train_like_one_device(options):
  _assert_like_one_device(_config(**options))


# Within a stage every ZeRO stage on meshes with tensor or data, with and without accumulation.
COMPOSED = [
  (mesh, zero, k)
  for mesh in (dict(fsdp=2, tensor=2), dict(data=2, fsdp=2))
  for zero in range(4)
  for k in (1, 2)
]


@pytest.mark.parametrize("mesh,zero,k", COMPOSED, ids=lambda c: str(c))
def test_every_zero_stage_composes_with_stages(mesh, zero, k):
  _assert_like_one_device(_config(stage=2, zero=zero, k=k, m=2, **mesh))


@pytest.mark.parametrize("options", [dict(stage=4, m=4), dict(stage=2, m=4, repeats=2)])
def test_nothing_a_bubble_computes_reaches_the_loss_or_gradients(monkeypatch, options):
  """Bubble iterations send NaN on (and stages receive NaN before their first microbatch):
  the masked schedule gives the same losses and parameters as sending zeros, in GPipe and in
  a circular schedule whose stage 0 refills its buffer slots (M > S)."""
  cfg = _config(**options)
  losses, params = _train(cfg)
  monkeypatch.setattr(pp, "BUBBLE_VALUE", float("nan"))
  poisoned_losses, poisoned = _train(cfg)
  assert np.isfinite(poisoned_losses).all()
  np.testing.assert_array_equal(poisoned_losses, losses)
  for a, b in zip(jax.tree.leaves(poisoned), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def _compiled(cfg):
  run = Trainer.build(cfg, devices=_devices(cfg))
  compiled = run.compile_train_step()
  return run, compiled, report.collective_traffic(compiled.as_text(), dict(run.layout.mesh.shape))


@pytest.mark.parametrize("repeats,k", [(1, 1), (2, 2)])
def test_collective_permutes_carry_one_microbatch_per_iteration(repeats, k):
  cfg = _config(stage=2, fsdp=2, tensor=2, zero=3, m=4, repeats=repeats, k=k)
  run, _, traffic = _compiled(cfg)
  schedule = run.layout.dims.pipeline
  rows = cfg.train.global_batch_size // k // (run.layout.mesh.shape["data"] * 2)  # per group
  activation = rows // schedule.microbatches * cfg.data.seq_len * cfg.model.d_model * 4
  theory = k * pp.permute_bytes(schedule, activation)
  permutes = traffic["collective-permute"]
  assert permutes["by_axes"] == {"stage": permutes["bandwidth_bytes"]}
  assert permutes["bandwidth_bytes"] == pytest.approx(theory, rel=0.02)


def _gradient_reductions(traffic) -> dict[str, float]:
  """Bandwidth bytes per op of the reductions over batch axes without stage."""
  return {
    op: sum(b for axes, b in traffic[op]["by_axes"].items() if axes and "stage" not in axes)
    - traffic[op]["by_axes"].get("tensor", 0.0)
    for op in ("all-reduce", "reduce-scatter")
  }


@pytest.mark.parametrize("zero", range(4))
def test_gradient_reductions_equal_a_run_of_one_stages_layers(zero):
  """Over (data, fsdp) the pipelined step reduces what a run without stages reduces for the
  layers of one stage; only the sums of the parameters outside the stacks cross the stages."""
  _, _, pipelined = _compiled(_config(stage=2, data=2, fsdp=2, zero=zero, m=2, k=2))
  _, _, flat = _compiled(_config(data=2, fsdp=2, zero=zero, layers=2, k=2))
  got, want = _gradient_reductions(pipelined), _gradient_reductions(flat)
  assert want["all-reduce"] > 0 and (zero == 0 or want["reduce-scatter"] > 0)
  for op in want:
    assert got[op] == pytest.approx(want[op], rel=0.02), op
  if zero == 0:  # over the stages: the summed gradients outside the stacks, whole (2 stages)
    run = Trainer.build(_config(stage=2, data=2, fsdp=2, m=2, k=2), devices=jax.devices())
    stacks = _stacks(run.layout.logical)
    outside = [
      x
      for k, v in run.layout.abstract_params.items()
      if k not in stacks
      for x in jax.tree.leaves(v)
    ]
    gradient_bytes = sum(x.size * 4 for x in outside)
    assert pipelined["all-reduce"]["by_axes"]["stage"] == pytest.approx(gradient_bytes, rel=0.02)


def _stack_bytes(layout: Layout, per_device: bool = True) -> int:
  stacks = _stacks(layout.logical)
  total = 0
  for key in stacks:
    for x, s in zip(
      jax.tree.leaves(layout.abstract_params[key]), jax.tree.leaves(layout.shardings.params[key])
    ):
      shape = s.shard_shape(x.shape) if per_device else x.shape
      total += math.prod(shape) * x.dtype.itemsize
  return total


@pytest.mark.parametrize("gather", ["step", "iteration"])
def test_zero3_gathers_equal_the_formula(gather):
  cfg = _config(stage=2, fsdp=2, tensor=2, zero=3, m=4, repeats=2, layers=4, pipeline_gather=gather)
  run, _, traffic = _compiled(cfg)
  layout, schedule = run.layout, run.layout.dims.pipeline
  fsdp = layout.mesh.shape["fsdp"]
  # One stage's layers whole over fsdp (tensor-split as stored): the stored shard times fsdp.
  stage_layers = _stack_bytes(layout) * fsdp
  top = sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize * fsdp
    for key in layout.abstract_params
    if key not in _stacks(layout.logical)
    for x, s in zip(
      jax.tree.leaves(layout.abstract_params[key]), jax.tree.leaves(layout.shardings.params[key])
    )
    if "fsdp" in jax.tree.leaves(tuple(s.spec))
  )
  if gather == "step":
    stack = stage_layers  # once per pass, kept through the backward
  else:  # every iteration one repeat's group, again when the backward recomputes it
    stack = 2 * schedule.iterations * stage_layers / schedule.repeats
  theory = (stack + top) * (fsdp - 1) / fsdp
  assert traffic["all-gather"]["by_axes"]["fsdp"] == pytest.approx(theory, rel=0.05)


def test_bubble_flops_equal_the_schedules_arithmetic():
  """Per-device matmul FLOPs: the layers' grow by (M*R + S - 1) / (M*R) over a run without
  stages on the same devices (stages as data); the embedding and the head do not."""

  # One layer per stage and repeat, so the iteration's recomputation is the per-layer one of the
  # run it is compared with. With k layers, recomputing the iteration also recomputes the MLP's
  # output matmul of its first k - 1 layers, which per-layer recomputation leaves out (a layer's
  # output is not needed for its own backward): +5.7% at k = 2, M = 4 in this tiny model.
  def flops(cfg):
    compiled = Trainer.build(cfg, devices=_devices(cfg)).compile_train_step()
    return report.dot_flops(compiled.as_text())

  rows = []
  for m, repeats in ((4, 1), (8, 1), (4, 2)):
    layers = 4 * repeats
    flat = flops(_config(data=4, layers=layers, remat="full"))  # recomputed as iterations are
    per_layer = (flat - flops(_config(data=4, layers=layers // 2, remat="full"))) / (layers // 2)
    factor = (m * repeats + 3) / (m * repeats)
    pipelined = flops(_config(stage=4, m=m, repeats=repeats, layers=layers))
    rows.append((pipelined, flat + (factor - 1) * layers * per_layer))
  for got, want in rows:
    assert got == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("zero", range(4))
def test_each_stage_holds_its_share_of_the_layers(zero):
  pipelined = Trainer.build(_config(stage=4, fsdp=2, zero=zero), devices=jax.devices())
  flat = Trainer.build(_config(fsdp=2, zero=zero), devices=jax.devices()[:2])
  assert _stack_bytes(pipelined.layout) == pytest.approx(_stack_bytes(flat.layout) / 4, rel=0.02)

  def stack_state_bytes(run):
    stacks = _stacks(run.layout.logical)
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(run.abstract_state().opt_state):
      if any(getattr(p, "key", None) in stacks for p in path):
        total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total

  assert stack_state_bytes(pipelined) == pytest.approx(stack_state_bytes(flat) / 4, rel=0.02)
  assert stack_state_bytes(flat) > 0


def test_eval_runs_the_pipeline_and_decoding_gathers_without_stages():
  cfg = _config(stage=2, fsdp=2, tensor=2, zero=3, m=2, repeats=2)
  cfg.decode.update(max_len=8, batch_size=4)
  flat_cfg = _config(fsdp=2, tensor=2, zero=3)
  flat_cfg.decode.update(max_len=8, batch_size=4)
  results = []
  for c in (cfg, flat_cfg):
    run = Trainer.build(c, devices=_devices(c))
    params = run.init_state().params
    batch = run.layout.shard_batch(random_batch(c, seed=9, padding=2))
    with jax.set_mesh(run.layout.mesh):
      loss = jax.jit(lambda p, b, layout=run.layout: _nll(layout, p, b))(params, batch)
    decoder = Decoder(run.layout, params, _VocabOnly(64), DecodeOptions.from_config(c.decode), 4)
    ids = decoder.decode_ids([[5, 6, 7], [8, 9]], beam_size=1)
    results.append((float(loss), ids.tolist()))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  assert results[0][1] == results[1][1]


def _nll(layout, params, batch):
  return objective.nll_sums(layout, params, batch)[0]


class _VocabOnly:
  pad_id, bos_id, eos_id = 0, 2, 3

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
  """A text file of the demo's English side, for runs through the training loop."""
  text = tmp_path_factory.mktemp("text") / "train.txt"
  pairs = synthetic.DemoSource(400, 0)
  text.write_text("\n".join(pairs[i][0] for i in range(400)) + "\n")
  return f"text:{text}"


def _loop_config(source, total, **mesh):
  cfg = _config(**mesh)
  cfg.data.update(pack=True, source=source, eval_examples=16)
  cfg.train.update(total_steps=total, log_every=1)
  cfg.checkpoint.update(every=2)
  cfg.eval.update(every=0, examples=2)  # the final evaluation decodes, without stages
  return cfg


def test_a_checkpoint_moves_between_pipelined_and_flat_meshes(tmp_path, text_source):
  """Layer order in checkpoints: 2 steps on a circular pipeline resume on a mesh without
  stages and back, with the losses of an uninterrupted run."""
  cfg_for = functools.partial(_loop_config, text_source)

  def losses(workdir):
    import json

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

  straight = tmp_path / "straight"
  lm_train.train(cfg_for(6, fsdp=8), str(straight))  # the runs take every device
  moved = tmp_path / "moved"
  pipelined = dict(stage=2, fsdp=4, m=2, repeats=2)
  lm_train.train(cfg_for(2, **pipelined), str(moved))
  lm_train.train(cfg_for(4, fsdp=8), str(moved))
  lm_train.train(cfg_for(6, **pipelined), str(moved))
  want, got = losses(straight), losses(moved)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose(
    [got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5
  )


def test_init_from_a_model_without_stages_restores_in_stage_order(tmp_path, text_source):
  """A checkpoint trained without stages, taken up by a circular pipeline (train.init_from):
  the same parameters in layer order, the same held-out loss."""
  source = tmp_path / "source"
  lm_train.train(_loop_config(text_source, 2, fsdp=8), str(source))
  runs = {}
  for name, mesh in (("flat", dict(fsdp=8)), ("pipelined", dict(stage=2, fsdp=4, m=2, repeats=2))):
    cfg = _loop_config(text_source, 2, **mesh)
    _, params, _, _ = inference.restore_model(str(source), cfg, "train.init_from")
    trainer = Trainer.build(cfg, devices=_devices(cfg))  # the run's own, as lm.train builds it
    layout = trainer.layout
    state = trainer.init_state(params)
    batch = layout.shard_batch(random_batch(cfg, seed=3, padding=2))
    with jax.set_mesh(layout.mesh):
      loss = jax.jit(lambda p, b, layout=layout: objective.nll_sums(layout, p, b)[0])
      runs[name] = float(loss(state.params, batch)), layout.to_layer_order(state.params)
  assert layout.reorders_layers  # the last run's: circular, stacks in stage order
  assert runs["pipelined"][0] == pytest.approx(runs["flat"][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(runs["pipelined"][1]), jax.tree.leaves(runs["flat"][1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BAD = [
  ("mesh.stage", dict(stage=0)),
  ("train.teacher", dict(stage=2, teacher="runs/some_teacher")),
  ("train.pipeline_microbatches", dict(stage=2, m=3)),
  ("train.pipeline_microbatches", dict(stage=4, m=2)),
  ("model.dec_layers", dict(stage=2, layers=3)),
  ("model.dec_layers", dict(stage=2, layers=2, repeats=2)),
  ("mesh.dcn_stage", dict(dcn_stage=2, fsdp=4)),  # one process, one slice
  ("mesh.stage", dict(stage=2, task="translation")),
  ("train.global_batch_size", dict(stage=2, m=2, data=4, global_batch_size=4)),
  ("train.pipeline_gather", dict(stage=2, pipeline_gather="layer")),
  ("train.sync_every", dict(stage=2, data=2, sync_every=2)),
]


@pytest.mark.parametrize("field,options", BAD, ids=[f"{f}:{o}" for f, o in BAD])
def test_bad_pipeline_configs_are_one_line_errors(field, options):
  options = dict(options)
  task = options.pop("task", "lm")
  mesh = {k: options.pop(k) for k in ("stage", "data", "fsdp", "dcn_stage") if k in options}
  cfg = tiny_config(
    task, dec_layers=options.pop("layers", 4), pipeline_repeats=options.pop("repeats", 1)
  )
  cfg.mesh.update(**mesh)
  cfg.train.update(pipeline_microbatches=options.pop("m", 0), **options)
  devices = jax.devices()[
    : math.prod(mesh.get(a, 1) for a in ("stage", "data", "fsdp", "dcn_stage"))
  ]
  with pytest.raises(ConfigError) as err:
    Trainer.build(cfg, devices=devices)
  message = str(err.value)
  assert message.startswith(f"config.{field}:"), message
  assert "\n" not in message


def test_a_layout_without_stages_keeps_the_device_order():
  layout = Layout.build(_config(stage=2, data=2, fsdp=2), devices=jax.devices())
  flat = layout.unpipelined()
  assert dict(flat.mesh.shape) == {"stage": 1, "data": 4, "fsdp": 2, "tensor": 1}
  assert list(flat.mesh.devices.flat) == list(layout.mesh.devices.flat)


def test_layer_order_round_trips():
  schedule = pp.Schedule(stages=2, repeats=3, microbatches=2)
  layers = np.arange(12)
  staged = np.asarray(pp.to_stage_order(layers, schedule))
  # Stage 0 holds groups 0, 2, 4 (layers 0-1, 4-5, 8-9); stage 1 groups 1, 3, 5.
  np.testing.assert_array_equal(staged, [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11])
  np.testing.assert_array_equal(np.asarray(pp.to_layer_order(staged, schedule)), layers)
  assert lmc.lm_defaults().mesh.stage == 1
