"""Starting from a trained model: init_from, frozen parameters, LoRA, adapters, distillation."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import demo
from lm import checkpoint, evaluate, inference, metrics, objective, train
from lm import config as lmc
from lm.data import pipeline, synthetic
from lm.data import tokenizer as tok
from lm.data.synthetic import random_batch
from lm.decode import DecodeOptions, Decoder
from lm.layout import Layout
from lm.models import layers
from lm.train_step import Trainer
from lm.trees import param_paths, select
from tests.helpers import tiny_config


def _logits(layout: Layout, params, batch) -> np.ndarray:
  with jax.set_mesh(layout.mesh):
    forward = jax.jit(lambda p, b: nnx.merge(layout.graphdef, p)(b))
    return np.asarray(forward(params, layout.shard_batch(batch)))


def _adapted_config(mesh=(1, 1, 1), stage=0, **model):
  cfg = tiny_config("translation", lora_rank=4, lora_targets=".", adapter_dim=8, **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.train.global_batch_size = 16
  cfg.data.pack = False
  cfg.optim.update(name="adamw", learning_rate=1e-2, eps=1e-6, weight_decay=0.1)
  return cfg


@functools.cache
def _base_params():
  """A base model's parameters (what LoRA and adapters start beside), on one device."""
  cfg = tiny_config("translation")
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  return jax.tree.map(np.asarray, run.init_state().params)


@pytest.mark.parametrize("adaptation", [dict(lora_rank=4, lora_targets="."), dict(adapter_dim=8)])
def test_lora_and_adapters_start_exactly_as_the_base_model(adaptation):
  """B (LoRA) and the up-projection (adapters) start at zero: logits equal bitwise."""
  base = Trainer.build(tiny_config("translation"), devices=jax.devices()[:1])
  adapted = Trainer.build(tiny_config("translation", **adaptation), devices=jax.devices()[:1])
  assert len(jax.tree.leaves(adapted.layout.abstract_params)) > len(
    jax.tree.leaves(base.layout.abstract_params)
  )
  params = adapted.init_state(_base_params()).params
  batch = random_batch(base.layout.cfg, seed=1, padding=2)
  np.testing.assert_array_equal(
    _logits(adapted.layout, params, batch), _logits(base.layout, _base_params(), batch)
  )


def _teacher(cfg, devices):
  """A teacher of another size on the student's mesh and stage (random: any teacher will do)."""
  teacher_cfg = tiny_config("translation", d_model=48, mlp_dim=96)
  teacher_cfg.mesh.update(cfg.mesh.to_dict())
  teacher_cfg.zero_stage = cfg.zero_stage
  teacher_cfg.seed = 7
  layout = Layout.build(teacher_cfg, devices=devices)
  return objective.Teacher(layout, layout.init_params())


def _train(cfg, steps: int = 3):
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  devices = jax.devices()[:n]
  run = Trainer.build(cfg, devices=devices, teacher=_teacher(cfg, devices))
  assert run.teacher is not None
  state = run.init_state(_base_params())
  step = run.compile_train_step()
  losses = []
  for seed in range(steps):
    state, m = step(state, run.layout.shard_batch(random_batch(cfg, seed=seed, padding=2)))
    losses.append(float(m["loss"]))
  return run, state, losses


@functools.cache
def _reference_losses():
  return _train(_adapted_config())[2]


# Each stage once and each mesh at least once (the suite's time): LoRA, adapters and the
# teacher are parameters under the same sharding rules as the base model, whose every mesh and
# stage tests/test_parallel.py holds to one device.
CASES = [((2, 2, 2), 0), ((1, 8, 1), 1), ((1, 2, 4), 2), ((2, 2, 2), 3)]


@pytest.mark.parametrize(
  "mesh,stage", CASES, ids=[f"{'x'.join(map(str, m))}-{s}" for m, s in CASES]
)
def test_lora_adapters_and_distillation_are_sharded_like_one_device_and_freeze_the_rest(
  mesh, stage
):
  """LoRA on every projection plus adapters, from a base model, distilled from a teacher of
  another width: the losses equal one device's, every base parameter is bitwise what it was,
  and the optimizer holds state for the factors alone (Adam: two numbers per trainable
  parameter)."""
  run, state, losses = _train(_adapted_config(mesh, stage))
  np.testing.assert_allclose(losses, _reference_losses(), rtol=1e-5)
  params = jax.device_get(state.params)
  base = _base_params()
  for path, old in zip(jax.tree.leaves(param_paths(base)), jax.tree.leaves(base)):
    new = params
    for key in path.split("/"):
      new = new[key]
    np.testing.assert_array_equal(new, old, err_msg=path)
  trained = select(params, run.trainable)
  assert all("_lora/" in p or "_adapter/" in p for p in jax.tree.leaves(param_paths(trained)))
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(trained))
  trainable = sum(x.size for x in jax.tree.leaves(trained))
  optimizer = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert 2 * trainable <= optimizer <= 2 * trainable + 8


def test_a_trainable_regex_freezes_everything_else():
  cfg = tiny_config("translation")
  cfg.train.update(trainable="^decoder/layers/mlp/", global_batch_size=16)
  cfg.data.pack = False
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  start = jax.tree.map(np.asarray, run.init_state().params)
  state, step = run.init_state(), run.compile_train_step()
  for seed in range(2):
    state, _ = step(state, run.layout.shard_batch(random_batch(cfg, seed=seed, padding=2)))
  paths = param_paths(start)
  for path, old, new in zip(
    jax.tree.leaves(paths), jax.tree.leaves(start), jax.tree.leaves(jax.device_get(state.params))
  ):
    assert np.array_equal(old, new) != path.startswith("decoder/layers/mlp/"), path
  cfg.train.trainable = "no_such_parameter"
  with pytest.raises(lmc.ConfigError, match=r"config\.train\.trainable: .* matches no parameter"):
    Trainer.build(cfg, devices=jax.devices()[:1])


def test_distillation_loss_is_cross_entropy_plus_kl_and_weight_zero_is_plain_training():
  cfg = tiny_config("translation")
  cfg.train.update(distill_weight=0.3, distill_temperature=2.0)
  devices = jax.devices()[:1]
  run = Trainer.build(cfg, devices=devices, teacher=_teacher(cfg, devices))
  params = run.init_state().params
  batch = {k: np.asarray(v) for k, v in random_batch(cfg, seed=2, padding=3).items()}
  teacher_logits = np.random.RandomState(0).normal(size=(*batch["targets"].shape, 128)) * 3
  # The teacher's outputs as (features, head): its logits themselves and the identity.
  loss, (tokens, _) = jax.jit(
    lambda p, b, t: objective.training_loss_sums(run.layout, p, b, None, (t, lambda x: x))
  )(params, batch, teacher_logits)

  logits = np.asarray(nnx.merge(run.layout.graphdef, params)(batch, None), np.float64)[..., :64]
  weights = batch["targets"] > 0
  log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  cross_entropy = -np.take_along_axis(log_q, batch["targets"][..., None], -1)[..., 0]
  t = 2.0
  soft = lambda x: x / t - np.log(np.exp(x / t).sum(-1, keepdims=True))
  log_p_teacher, log_p_student = soft(teacher_logits[..., :64]), soft(logits)
  kl = (np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(-1)
  expected = 0.7 * cross_entropy[weights].sum() + 0.3 * t**2 * kl[weights].sum()
  assert float(tokens) == weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

  # Weight 0: no teacher in the step at all, the same program as plain training.
  cfg.train.distill_weight = 0.0
  without = Trainer.build(cfg, devices=devices, teacher=_teacher(cfg, devices))
  plain = Trainer.build(tiny_config("translation"), devices=devices)
  assert without.teacher is None
  assert without.lower_train_step().as_text() == plain.lower_train_step().as_text()


def _demo(mesh, stage, **train_fields):
  cfg = demo.get_config("tiny")
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.data.update(tokenizer_sample=2000, eval_examples=16)
  cfg.eval.update(bleu=False, examples=0)
  cfg.train.update(log_every=1, **train_fields)
  return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(workdir, final results) of the demo trained 4 steps on (1, 8, 1) ZeRO-3."""
  workdir = str(tmp_path_factory.mktemp("source"))
  return workdir, train.train(_demo((1, 8, 1), 3, total_steps=4), workdir)


def test_init_from_restores_onto_another_mesh_and_lora_merges_into_the_export(source, tmp_path):
  """A source trained on (1, 8, 1) ZeRO-3, fine-tuned with LoRA on (2, 2, 2) ZeRO-1: at step 0
  the eval loss is the source's; after training the base weights are the source's bitwise; a
  resume takes the fine-tune's own checkpoint; the merged export computes what LoRA did."""
  source, results = source

  workdir = str(tmp_path / "fine_tune")
  cfg = _demo((2, 2, 2), 1, total_steps=3, init_from=source)
  cfg.model.update(lora_rank=4, d_model=64)  # d_model: not an override, taken from the source
  cfg.optim.update(schedule="constant", learning_rate=1e-2)
  with pytest.raises(
    lmc.ConfigError, match=r"config\.model\.d_model: 64 changes the model .* \(128\)"
  ):
    lmc.adopt_model(cfg, checkpoint.meta_config(inference.source_meta(source)), {"model.d_model"})
  adopted = lmc.adopt_model(cfg, checkpoint.meta_config(inference.source_meta(source)))
  assert adopted.model.d_model == 128

  def start(workdir):
    tok.save(checkpoint.meta_tokenizer(inference.source_meta(source)), workdir)
    data = pipeline.load(adopted, workdir, print)
    run = Trainer.build(adopted, tokenizer_size=data.tokenizer.vocab_size)
    checkpoints = checkpoint.Checkpointer(workdir, adopted)
    try:
      batches = pipeline.TrainIterator(data)
      state = train.restore_or_init(run, checkpoints, batches, metrics.Console())
    finally:
      checkpoints.close()
    return run, data, state

  run, data, state = start(workdir)
  assert int(state.step) == 0
  at_start = evaluate.Evaluator(run.layout, data, None).teacher_forced(state.params)
  np.testing.assert_allclose(at_start["eval_loss"], results["eval_loss"], rtol=1e-5)

  train.train(cfg, workdir)
  with open(f"{workdir}/metrics.jsonl") as f:
    first = next(m for m in map(json.loads, f) if "eval_loss" in m)
  assert first["step"] == 0  # the loop evaluates its starting point
  np.testing.assert_allclose(first["eval_loss"], results["eval_loss"], rtol=1e-5)
  _, tuned, _, step = inference.restore_latest(workdir)
  _, original, _, _ = inference.restore_latest(source)
  assert step == 3
  for path, x in zip(jax.tree.leaves(param_paths(original)), jax.tree.leaves(original)):
    y = tuned
    for key in path.split("/"):
      y = y[key]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=path)
  assert int(start(workdir)[2].step) == 3  # its own checkpoint wins over init_from

  export = str(tmp_path / "merged")
  inference.export(workdir, export, merge_lora=True)
  merged_run, merged, tokenizer, _ = inference.restore_export(export)
  lora_run, lora, _, _ = inference.restore_latest(workdir)
  assert merged_run.cfg.model.lora_rank == 0 and "query_lora" not in str(param_paths(merged))
  batch = random_batch(merged_run.cfg, seed=3, padding=2)
  np.testing.assert_allclose(
    _logits(merged_run, merged, batch), _logits(lora_run, lora, batch), rtol=1e-5, atol=1e-5
  )
  lines = [text for text, _ in data.eval_text[:8]]
  options = DecodeOptions(beam_size=2, max_len=24)
  assert Decoder(merged_run, merged, tokenizer, options, 8)(lines) == Decoder(
    lora_run, lora, tokenizer, options, 8
  )(lines)


def test_a_half_width_student_distils_from_a_trained_teacher(source, tmp_path, capsys):
  """train.teacher end to end on (2, 2, 2) ZeRO-3; a teacher with other token ids is refused
  before anything compiles."""
  teacher, _ = source
  cfg = _demo((2, 2, 2), 3, total_steps=2, teacher=teacher)
  cfg.model.update(d_model=64, mlp_dim=256)
  cfg.data.tokenizer = f"{teacher}/tokenizer.model"
  results = train.train(cfg, str(tmp_path / "student"))
  assert np.isfinite(results["eval_loss"])
  assert f"teacher: {teacher} (step 4), 0.96M params, frozen" in capsys.readouterr().out
  cfg.data.tokenizer = ""
  cfg.model.vocab_size = 100  # its own tokenizer, with other pieces
  with pytest.raises(lmc.ConfigError, match=r"config\.train\.teacher: its tokenizer .* is not"):
    train.train(cfg, str(tmp_path / "other_tokens"))


def test_int8_quantization_is_symmetric_per_output_channel():
  rng = np.random.RandomState(0)
  params = {"attn": {"query": rng.normal(size=(2, 8, 4, 3)), "out": rng.normal(size=(2, 4, 3, 8))}}
  params["attn"]["query"][1, :, 2, 1] = 0.0  # an all-zero channel
  quantized = jax.jit(layers.quantize_int8)(jax.tree.map(np.float32, params))["attn"]
  for name, inputs in (("query", (1,)), ("out", (1, 2))):
    w = params["attn"][name].astype(np.float32)
    scale = np.abs(w).max(axis=inputs) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w / np.expand_dims(scale, inputs)), -127, 127)
    assert quantized[name].dtype == np.int8
    np.testing.assert_allclose(np.asarray(quantized[f"{name}_scale"]), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(quantized[name]), q)
    dequantized = q * np.expand_dims(scale, inputs)
    assert np.all(np.abs(dequantized - w) <= np.expand_dims(scale, inputs) / 2 + 1e-7)


def test_an_int8_export_holds_under_a_third_of_the_bytes_and_runs_dequantized(
  trained_workdir, tmp_path
):
  """Decode and eval load it; its logits are the float model's with the dequantized weights."""
  exports = {}
  for dtype in ("float32", "int8"):
    inference.export(str(trained_workdir), str(tmp_path / dtype), dtype)
    exports[dtype] = inference.restore_export(str(tmp_path / dtype))
  (run_f, float_params, tokenizer, _), (run_q, int8_params, _, _) = exports.values()
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(int8_params) <= 0.3 * nbytes(float_params), (
    nbytes(int8_params),
    nbytes(float_params),
  )

  def dequantized(tree):
    out = {}
    for key, value in tree.items():
      if key.endswith("_scale") and key[: -len("_scale")] in layers.QUANTIZED_KERNELS:
        continue
      if isinstance(value, dict):
        out[key] = dequantized(value)
      elif key in layers.QUANTIZED_KERNELS:
        out[key] = (
          np.asarray(value, np.float32)
          * np.asarray(tree[f"{key}_scale"])[
            (slice(None),) * (value.ndim - sum(layers.QUANTIZED_KERNELS[key]))
            + (None,) * layers.QUANTIZED_KERNELS[key][0]
          ]
        )
      else:
        out[key] = value
    return out

  batch = random_batch(run_q.cfg, seed=5, padding=2)
  np.testing.assert_allclose(
    _logits(run_q, int8_params, batch),
    _logits(run_f, dequantized(jax.device_get(int8_params)), batch),
    rtol=1e-5,
    atol=1e-5,
  )
  losses = {}
  for dtype, (run, params, _, _) in exports.items():
    data = pipeline.load(run.cfg, str(tmp_path / f"data_{dtype}"), print, tokenizer)
    losses[dtype] = evaluate.Evaluator(run, data, None).teacher_forced(params)["eval_loss"]
  assert abs(losses["int8"] - losses["float32"]) <= 0.01 * losses["float32"], losses
  lines = [text for text, _ in data.eval_text[:16]]
  decoded = Decoder.from_workdir(str(trained_workdir), export=str(tmp_path / "int8"))(lines)
  assert (
    sum(a == b for a, b in zip(decoded, Decoder.from_workdir(str(trained_workdir))(lines))) >= 12
  )


def test_the_shifted_demo_language_moves_only_the_verb():
  plain, shifted = synthetic.DemoSource(50, 3), synthetic.DemoSource(50, 3, "shifted")
  moved = 0
  for i in range(50):
    (source, target), (same_source, other) = plain[i], shifted[i]
    assert source == same_source and sorted(target.split()) == sorted(other.split())
    moved += target != other
  assert moved >= 45
