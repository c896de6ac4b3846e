"""Masks, positions and parameter counts of both model families."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import gpt2, wmt_ende
from lm import objective
from lm.config import REMAT as REMAT_CHOICES
from lm.data.synthetic import random_batch
from lm.models.layers import Mlp, Norm, dropout, rotary
from lm.models.loss import cross_entropy_sums
from lm.models.transformer import ModelDims, build_model, segment_ids
from lm.train_step import Trainer
from lm.trees import param_count
from tests.helpers import tiny_config


def _model(task, **kw):
  cfg = tiny_config(task, **kw)
  dims = ModelDims.from_config(cfg.model, platform="cpu")
  with nnx.use_eager_sharding(False):
    return build_model(task, dims, seed=0)


def _tokens(seed, shape=(2, 12), low=4, high=64):
  return jnp.asarray(np.random.RandomState(seed).randint(low, high, size=shape), jnp.int32)


@pytest.mark.parametrize("task", ["translation", "lm"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rotary"])
def test_logits_do_not_depend_on_later_tokens(task, positions):
  model = _model(task, positions=positions)
  targets = _tokens(0)
  changed = targets.at[:, 7:].set(_tokens(1)[:, 7:])
  batch = {"targets": targets, "inputs": _tokens(2)}
  a = model(batch)
  b = model({**batch, "targets": changed})
  # Decoder input t is target t-1 (shift right), so logits up to t=7 see targets < 7 only.
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)
  assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-3


def _packed(first, second):
  """Two examples packed in one row: segment ids 1 and 2, positions restart at 0."""
  n1, n2 = first.shape[1], second.shape[1]
  tokens = jnp.concatenate([first, second], axis=1)
  segments = jnp.asarray([[1] * n1 + [2] * n2], jnp.int32)
  positions = jnp.asarray([list(range(n1)) + list(range(n2))], jnp.int32)
  return tokens, segments, positions


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_packed_segments_do_not_see_each_other(task):
  model = _model(task, positions="rotary" if task == "lm" else "sinusoidal")
  t1, t2, s1, s2 = _tokens(3, (1, 5)), _tokens(4, (1, 7)), _tokens(5, (1, 6)), _tokens(6, (1, 4))
  targets, tseg, tpos = _packed(t1, t2)
  inputs, iseg, ipos = _packed(s1, s2)
  packed = model(
    {
      "targets": targets,
      "targets_segment_ids": tseg,
      "targets_positions": tpos,
      "inputs": inputs,
      "inputs_segment_ids": iseg,
      "inputs_positions": ipos,
    }
  )
  alone1 = model({"targets": t1, "inputs": s1})
  alone2 = model({"targets": t2, "inputs": s2})
  np.testing.assert_allclose(packed[:, :5], alone1, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], alone2, atol=1e-5)


@pytest.mark.parametrize("pad_id", [0, 5])
@pytest.mark.parametrize("task", ["translation", "lm"])
def test_padding_does_not_change_the_loss(task, pad_id):
  """Segment ids, not a token id, mark the padding: padding with a real token's id (5) is as
  invisible as padding with 0."""
  model = _model(task)
  targets, inputs = _tokens(7, (2, 9)), _tokens(8, (2, 6))

  def pad(x, n):
    return jnp.pad(x, ((0, 0), (0, n)), constant_values=pad_id)

  padded = {
    "targets": pad(targets, 5),
    "targets_segment_ids": jnp.pad(jnp.ones_like(targets), ((0, 0), (0, 5))),
    "inputs": pad(inputs, 3),
    "inputs_segment_ids": jnp.pad(jnp.ones_like(inputs), ((0, 0), (0, 3))),
  }

  def loss(batch):
    weights = (segment_ids(batch, "targets") > 0).astype(jnp.float32)
    total, count, _ = cross_entropy_sums(model(batch), batch["targets"], weights)
    return total / count

  np.testing.assert_allclose(loss({"targets": targets, "inputs": inputs}), loss(padded), rtol=1e-6)


def analytic_param_count(m, task: str) -> int:
  """Parameters of the architecture, from its formula (independent of the model code)."""
  d, h, f = m.d_model, m.num_heads, m.mlp_dim
  v = -(-m.vocab_size // 128) * 128  # the embedding is padded to a multiple of 128
  k = m.head_dim or d // h
  bias = m.use_bias
  attention = 4 * d * h * k + (2 * h * k + d if bias else 0)  # no key bias
  mlp = (3 if m.activation == "swiglu" else 2) * d * f + (f + d if bias else 0)
  norm = 2 * d if m.norm == "layernorm" else d
  encoder_layer = attention + mlp + 2 * norm
  decoder_layer = attention * (2 if task == "translation" else 1) + mlp
  decoder_layer += norm * (3 if task == "translation" else 2)
  total = v * d + (0 if m.tie_embeddings else d * v)
  total += m.max_len * d if m.positions == "learned" else 0
  total += m.dec_layers * decoder_layer + norm
  if task == "translation":
    total += m.enc_layers * encoder_layer + norm
  return total


@pytest.mark.parametrize(
  "module, variant, published",
  [(wmt_ende, "base", 65e6), (wmt_ende, "big", 213e6), (gpt2, "small", 124e6)],
)
def test_parameter_count_matches_formula_and_paper(module, variant, published):
  cfg = module.get_config(variant)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  count = param_count(run.layout.abstract_params)
  assert count == analytic_param_count(cfg.model, cfg.task)
  assert abs(count - published) / published < 0.05, count


def _grads(cfg):
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  params = run.init_state().params
  batch = run.layout.shard_batch(random_batch(cfg, seed=4, padding=2))
  with jax.set_mesh(run.layout.mesh):
    (loss, _), grads = jax.jit(
      jax.value_and_grad(functools.partial(objective.training_loss_sums, run.layout), has_aux=True)
    )(params, batch, jax.random.key(1))
  return float(loss), jax.device_get(grads)


def test_remat_policies_give_the_same_loss_and_gradients():
  # Translation runs both layer stacks (encoder and decoder with cross-attention).
  policies = [r for r in REMAT_CHOICES if r != "auto"]  # auto resolves to one of them
  cfg = {r: tiny_config("translation", remat=r, dropout_rate=0.1) for r in policies}
  results = {r: _grads(c) for r, c in cfg.items()}
  loss, grads = results["none"]
  for remat in ("full", "save_dots"):
    other_loss, other_grads = results[remat]
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
      # Recomputation may fuse differently: equal within fp32 rounding of the tensor's scale.
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_remat_auto_is_save_dots_only_for_sharded_parameters():
  cfg = tiny_config()
  assert ModelDims.from_config(cfg.model).remat == "none"
  assert ModelDims.from_config(cfg.model, params_sharded=True).remat == "save_dots"
  cfg.model.remat = "none"
  assert ModelDims.from_config(cfg.model, params_sharded=True).remat == "none"


def _dims(**kw):
  return ModelDims.from_config(tiny_config(**kw).model, platform="cpu")


def test_rmsnorm_matches_numpy():
  rng = np.random.RandomState(0)
  with nnx.use_eager_sharding(False):
    norm = Norm(_dims(d_model=32, norm="rmsnorm", norm_eps=1e-6), nnx.Rngs(params=0))
  norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 32), jnp.float32)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32) * 3
  expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_swiglu_mlp_matches_numpy():
  with nnx.use_eager_sharding(False):
    mlp = Mlp(_dims(activation="swiglu", use_bias=False), nnx.Rngs(params=0))
  x = np.random.RandomState(1).normal(size=(2, 5, 32)).astype(np.float32)
  wi, gate, wo = (np.asarray(w[...], np.float64) for w in (mlp.wi, mlp.wi_gate, mlp.wo))
  g = x @ gate
  expected = (g / (1 + np.exp(-g)) * (x @ wi)) @ wo  # silu(x W_gate) * (x W_in), then W_out
  np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def test_rotary_matches_numpy_and_depends_on_relative_position():
  rng = np.random.RandomState(2)
  x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)  # [b, l, heads, kv]
  positions = np.asarray([[0, 5, 17]])
  half = 4
  expected = np.empty_like(x)
  for t, p in enumerate(positions[0]):
    for i in range(half):  # dims i and i + half rotate together by p / 10000^(i / half)
      angle = p / 10000.0 ** (i / half)
      a, b = x[0, t, :, i], x[0, t, :, i + half]
      expected[0, t, :, i] = a * np.cos(angle) - b * np.sin(angle)
      expected[0, t, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
  np.testing.assert_allclose(rotary(jnp.asarray(x), jnp.asarray(positions)), expected, atol=1e-5)

  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])

  def score(m, n):
    return (rotary(q, jnp.asarray([[m]])) * rotary(k, jnp.asarray([[n]]))).sum()

  np.testing.assert_allclose(score(3, 7), score(13, 17), rtol=1e-4)
  assert abs(float(score(3, 7)) - float(score(3, 8))) > 1e-3


@pytest.mark.parametrize("width", [256, 30])  # four bytes per 32-bit draw, and one per draw
def test_dropout_drops_its_rate_and_a_row_depends_on_its_key_alone(width):
  x = jnp.ones((64, 32, width))
  keys = jax.random.split(jax.random.key(0), 64)
  y = np.asarray(dropout(x, 0.1, keys))
  np.testing.assert_allclose((y == 0).mean(), 26 / 256, atol=0.005)  # the rate, in 1/256ths
  np.testing.assert_allclose(y.mean(), 1.0, atol=0.01)  # kept values are scaled up
  alone = np.asarray(dropout(x[5:7], 0.1, keys[5:7]))
  np.testing.assert_array_equal(alone, y[5:7])
  assert not (y[0] == y[1]).all()  # rows draw apart


def test_zerolm_models_parameters_are_what_they_were():
  """A bias-carrying rotary model has no key bias (only Qwen2-style qkv_bias adds one), so
  checkpoints written before the imported architectures' options restore."""
  for options, has_key_bias in ((dict(positions="rotary"), False), (dict(qkv_bias=True), False)):
    layout_params = _params_of(tiny_config("lm", **options))
    assert ("key_bias" in layout_params["decoder"]["layers"]["self_attn"]) == has_key_bias
  rotary_qkv = _params_of(tiny_config("lm", positions="rotary", use_bias=False, qkv_bias=True))
  assert "key_bias" in rotary_qkv["decoder"]["layers"]["self_attn"]
  assert "out_bias" not in rotary_qkv["decoder"]["layers"]["self_attn"]


def _params_of(cfg):
  from lm.layout import Layout

  return Layout.build(cfg, devices=jax.devices()[:1]).abstract_params
