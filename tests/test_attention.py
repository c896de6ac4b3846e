"""Attention's paths (lm/models/attention.py): each one available on CPU trains, decodes and
serves as today's whole-length XLA attention did, in bounded memory when chunked."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config as lmc
from lm import decode, engine
from lm.data.synthetic import random_batch
from lm.data.tokenizer import BOS_ID, EOS_ID
from lm.layout import Layout
from lm.models import attention
from lm.models.attention import AttentionMask
from lm.train_step import Trainer
from tests.helpers import tiny_config

STEPS = 3


def _dense(mask: AttentionMask) -> jax.Array:
  """Today's [b, 1, t, s] mask (the former layers.attention_mask), for the references."""
  return mask.dense(mask.q_segments, mask.positions())


def _qkv(b=2, t=12, s=12, h=4, g=2, d=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(
    jax.random.normal(key, (b, n, heads, d)) for key, n, heads in zip(keys, (t, s, s), (h, g, g))
  )


def _packed_segments(b, t):
  """Two examples per row, then padding."""
  ids = np.zeros((b, t), np.int32)
  ids[:, : t // 3], ids[:, t // 3 : t - 2] = 1, 2
  return jnp.asarray(ids)


@pytest.mark.parametrize("chunk", [0, 4, 5, 12, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_xla_attention_equals_the_whole_mask_in_value_and_gradient(chunk, causal):
  q, k, v = _qkv()
  segments = _packed_segments(2, 12)
  mask = AttentionMask(segments, segments, causal=causal, packed=True)
  real = (segments > 0)[:, :, None, None]  # padding queries' outputs are read by no loss

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)

  ours = lambda q, k, v: attention.attend(q, k, v, mask, implementation="xla", chunk=chunk)
  today = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=_dense(mask))
  got = jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1, 2))(q, k, v)
  want = jax.value_and_grad(functools.partial(loss, today), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_decode_step_sees_the_cache_up_to_its_own_index():
  q, k, v = _qkv(b=3, t=1, s=10)
  index = jnp.asarray([0, 4, 9])
  mask = AttentionMask.decode(index, 3, 10)
  visible = jnp.arange(10)[None, :] <= index[:, None]
  np.testing.assert_array_equal(_dense(mask)[:, 0, 0], visible)
  got = attention.attend(q, k, v, mask, implementation="xla", chunk=4)
  want = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None, None, :])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def splash_interpreted(monkeypatch):
  """Splash attention's Pallas kernel in interpret mode: the TPU path, run on CPU."""
  monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)


@pytest.mark.parametrize("g", [4, 2])
def test_splash_attention_equals_xla_on_real_positions(splash_interpreted, g):
  q, k, v = _qkv(b=2, t=128, s=128, g=g)
  segments = _packed_segments(2, 128)
  mask = AttentionMask(segments, segments, causal=True, packed=True)
  real = (segments > 0)[:, :, None, None]

  def loss(implementation, q, k, v):
    y = attention.attend(q, k, v, mask, implementation=implementation)
    return jnp.sum(jnp.where(real, y, 0.0) ** 2)

  got = jax.value_and_grad(functools.partial(loss, "splash"), argnums=(0, 1, 2))(q, k, v)
  want = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # Absolute slack at 1e-5 of the tensor's scale: a first query's gradient is 0 in exact
    # arithmetic (it sees only itself) and rounding in either kernel.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


# Training: the real step under ZeRO-3 and tensor parallelism on (2, 2, 2), grouped-query
# attention (2 KV heads for 4 query heads), against one device with today's form.


def _config(
  task, packed, mesh=(1, 1, 1), stage=0, attention_choice="xla", chunk=0, seq_len=16, **model
):
  model = {"num_kv_heads": 2, **model}
  cfg = tiny_config(task, attention=attention_choice, attention_chunk=chunk, **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.data.update(seq_len=seq_len, pack=packed)
  cfg.model.max_len = max(cfg.model.max_len, seq_len)
  cfg.train.update(global_batch_size=16, microbatches=2)
  # Plain SGD at lr 1, unclipped: each step's parameter change is minus its gradient.
  cfg.optim.update(name="sgd", learning_rate=1.0, clip_norm=0.0, weight_decay=0.0)
  return cfg


def _batch(cfg, step: int, packed: bool) -> dict:
  batch = random_batch(cfg, seed=step, padding=2, packed=packed)
  if packed and "inputs" in batch:  # a packed row holds whole pairs: each target has its source
    batch["inputs_segment_ids"] = batch["targets_segment_ids"].copy()
  if packed:  # two examples in every row: segments 1 and 2, positions restarting at the second
    for side in [s for s in ("inputs", "targets") if s in batch]:
      t = batch[side].shape[1]
      second = np.arange(t) >= t // 2
      batch[side + "_segment_ids"] = batch[side + "_segment_ids"] * (1 + second)
      batch[side + "_positions"] = np.where(second, np.arange(t) - t // 2, np.arange(t))
      batch[side + "_positions"] = np.broadcast_to(
        batch[side + "_positions"], (len(batch[side]), t)
      )
  return batch


def _train(cfg, packed: bool):
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  run = Trainer.build(cfg, devices=jax.devices()[:n])
  state, step = run.init_state(), run.compile_train_step()
  host = lambda state: [np.array(x, copy=True) for x in jax.tree.leaves(state.params)]
  params, losses, grads = host(state), [], []
  scales = [np.abs(p).max() for p in params]
  for i in range(STEPS):
    state, metrics = step(state, run.layout.shard_batch(_batch(cfg, i, packed)))
    losses.append(float(metrics["loss"]))
    new = host(state)
    grads.append([before - after for before, after in zip(params, new)])
    params = new
  return grads, losses, scales


def _todays_attend(q, k, v, mask, *, implementation, chunk):
  """The layer's attention before masks became segment ids: jax.nn's default call on the
  whole [b, 1, t, s] mask."""
  del implementation, chunk
  return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(mask.q_segments, mask.positions()))


@functools.cache
def _reference(task, packed, seq_len, kv_heads, layers):
  """One device, and every layer's attention through _todays_attend: the reference is today's
  arithmetic, not the new path at another setting."""
  cfg = _config(task, packed, seq_len=seq_len, num_kv_heads=kv_heads)
  cfg.model.update(enc_layers=layers, dec_layers=layers)
  with mock.patch.object(attention, "attend", _todays_attend):
    return _train(cfg, packed)


def _assert_trains_like_today(task, packed, cfg):
  grads, losses, _ = _train(cfg, packed)
  ref_grads, ref_losses, scales = _reference(
    task, packed, cfg.data.seq_len, cfg.model.num_kv_heads, cfg.model.dec_layers
  )
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for step_grads, ref_step_grads in zip(grads, ref_grads):  # every step's gradient
    for a, b, scale in zip(step_grads, ref_step_grads, scales):
      # Within 1e-5 of the tensor's scale, plus two ulps of the parameter it was read off.
      bound = 1e-5 * np.abs(b).max() + 2 * np.finfo(np.float32).eps * scale
      assert np.abs(a - b).max() <= bound, (np.abs(a - b).max(), bound)


@pytest.mark.parametrize("task", ["translation", "lm"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [4, 5])  # 5 does not divide the length 16
def test_chunked_xla_attention_trains_like_today_under_zero3_and_tensor(task, packed, chunk):
  cfg = _config(task, packed, (2, 2, 2), 3, "xla", chunk)
  _assert_trains_like_today(task, packed, cfg)


# Splash inside the train step's region (manual over the batch axes, tensor automatic): 2 key/value
# heads split over tensor like the query heads, and 1 replicated while tensor splits the queries.
# Each family packed and unpacked, each with both head layouts across the pair (interpret
# mode is slow: 4 of the 8 combinations).
@pytest.mark.parametrize(
  "task,packed,kv_heads",
  [("translation", False, 1), ("translation", True, 2), ("lm", False, 2), ("lm", True, 1)],
)
def test_splash_attention_trains_like_today_under_zero3_and_tensor(
  splash_interpreted, task, packed, kv_heads
):
  cfg = _config(task, packed, (2, 2, 2), 3, "splash", seq_len=128, num_kv_heads=kv_heads)
  cfg.model.update(enc_layers=1, dec_layers=1)
  assert Layout.build(cfg, devices=jax.devices()).dims.attention == "splash"
  _assert_trains_like_today(task, packed, cfg)


def _model_loss_and_grads(cfg, packed, devices):
  """The model's mean NLL and its gradient, jitted outside any manual region (as evaluation
  and prefill run), on the config's mesh with ZeRO-3's sharded parameters."""
  layout = Layout.build(cfg, devices=devices)

  def loss(params, batch):
    logits = nnx.merge(layout.graphdef, params)(batch)
    real = batch["targets_segment_ids"] > 0
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(real, nll, 0.0)) / jnp.sum(real)

  with jax.set_mesh(layout.mesh):
    batch = layout.shard_batch(_batch(cfg, 0, packed))
    value, grads = jax.jit(jax.value_and_grad(loss))(layout.init_params(), batch)
  return float(value), jax.tree.leaves(jax.device_get(grads))


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_splash_attention_gives_todays_loss_and_gradients_on_a_sharded_mesh(
  splash_interpreted, task
):
  cfg = _config(task, True, (2, 2, 2), 3, "splash", seq_len=128)
  assert Layout.build(cfg, devices=jax.devices()).dims.attention == "splash"
  value, grads = _model_loss_and_grads(cfg, True, jax.devices())
  ref_value, ref_grads = _model_loss_and_grads(
    _config(task, True, seq_len=128), True, jax.devices()[:1]
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(grads, ref_grads):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


# Decoding: the cache's steps, greedy and beam search with chunked attention configured.


def _decoder(task, chunk, beam, mesh=(1, 1, 1)):
  cfg = tiny_config(task, num_kv_heads=2, attention="xla", attention_chunk=chunk)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  run = Layout.build(cfg, devices=jax.devices()[: int(np.prod(mesh))])
  options = decode.DecodeOptions(beam_size=beam, max_len=12)
  return run, decode.Decoder(run, run.init_params(), _Ids(), options, batch_size=8)


class _Ids:  # token ids in, ids out: no tokenizer needed
  vocab_size = 60
  pad_id, bos_id, eos_id = 0, BOS_ID, EOS_ID


@pytest.mark.parametrize("task", ["translation", "lm"])
@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_with_chunked_attention_equals_today(task, beam):
  rows = np.random.RandomState(7).randint(4, 60, size=(6, 9))
  prompts = [
    list(row[: 3 + i]) + ([EOS_ID] if task == "translation" else []) for i, row in enumerate(rows)
  ]
  outputs = [
    _decoder(task, chunk, beam, mesh)[1].decode_ids(prompts)
    for chunk, mesh in ((0, (1, 1, 1)), (4, (2, 1, 2)))
  ]
  np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("task", ["lm", "translation"])
def test_the_engine_with_chunked_attention_serves_what_today_decodes(task):
  from tests import test_engine

  chunked = test_engine._decoder(task, attention="xla", attention_chunk=3)
  today = test_engine._decoder(task, attention="xla", attention_chunk=0)
  eng = engine.Engine(chunked, 4, 2, prefill_rows=4)  # prefill widths of 8+: chunked
  eng.warm_up()
  requests = test_engine._requests(task, 8, seed=3)
  eng.start()
  try:
    results = test_engine._run(eng, requests)
  finally:
    eng.stop()
  for r, (tokens, _) in zip(requests, results):
    assert tokens == test_engine._alone(today, r), r


# Memory: one attention layer's forward and backward, compiled on one device.


def _temp_bytes(length: int, chunk: int) -> int:
  b, h, d = 1, 4, 32
  q = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
  segments = jax.ShapeDtypeStruct((b, length), jnp.int32)

  def loss(q, k, v, segments):
    mask = AttentionMask(segments, segments, causal=True, packed=True)
    return jnp.sum(attention.attend(q, k, v, mask, implementation="xla", chunk=chunk) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grads.lower(q, q, q, segments).compile().memory_analysis().temp_size_in_bytes


def test_chunked_attention_memory_grows_linearly_with_length():
  temp = {(n, c): _temp_bytes(n, c) for n in (1024, 2048, 4096) for c in (0, 256)}
  print({f"length {n} chunk {c}": f"{v / 2**20:.1f} MiB" for (n, c), v in temp.items()})
  assert temp[4096, 256] < 8 * temp[1024, 256]
  assert temp[4096, 0] > 10 * temp[1024, 0]
  assert temp[4096, 256] * 8 < temp[4096, 0]


# Configuration: bad values are one-line errors before anything compiles.


@pytest.mark.parametrize(
  "field,value,words",
  [
    ("model.attention", "flash", "is not one of"),
    ("model.attention_chunk", -1, "must be a number >= 0"),
  ],
)
def test_bad_attention_values_are_one_line_errors(field, value, words):
  cfg = tiny_config("lm")
  cfg.model[field.split(".")[1]] = value
  with pytest.raises(lmc.ConfigError, match=words) as e:
    lmc.validate(cfg)
  assert str(e.value).startswith(f"config.{field}:") and "\n" not in str(e.value)


@pytest.mark.parametrize("choice,needs", [("cudnn", "GPU"), ("splash", "TPU")])
def test_a_kernel_the_platform_lacks_is_a_config_error(choice, needs):
  cfg = tiny_config("lm", attention=choice, max_len=128)
  cfg.data.update(pack=False, seq_len=128)
  with pytest.raises(lmc.ConfigError, match=f"config.model.attention: '{choice}' needs a {needs}"):
    Layout.build(cfg, devices=jax.devices()[:1])


def test_auto_on_cpu_is_xla_and_cudnn_takes_no_packed_rows():
  assert Layout.build(tiny_config("lm"), devices=jax.devices()[:1]).dims.attention == "xla"
  assert attention.resolve("auto", "gpu", jnp.float32, 64) == "xla"  # cuDNN: half precision
  assert attention.resolve("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
  assert attention.resolve("auto", "tpu", jnp.bfloat16, 64) == "splash"
  with pytest.raises(lmc.ConfigError, match="model.attention: cudnn takes bfloat16"):
    attention.resolve("cudnn", "gpu", jnp.float32, 64)
  cfg = tiny_config("lm", attention="cudnn")
  with pytest.raises(lmc.ConfigError, match="config.model.attention: cudnn takes no packed"):
    lmc.validate(cfg)


def test_splash_on_a_length_it_cannot_tile_is_a_config_error_and_auto_falls_back(caplog):
  cfg = tiny_config("lm", attention="splash")  # data.seq_len 16
  with pytest.raises(lmc.ConfigError, match="config.model.attention: .*data.seq_len=16") as e:
    lmc.validate(cfg)
  assert "\n" not in str(e.value)
  q, k, v = _qkv(t=16, s=16)
  segments = jnp.ones((2, 16), jnp.int32)
  mask = AttentionMask(segments, segments, causal=True)
  attention._log_once.cache_clear()  # the line is logged once per process
  with caplog.at_level("INFO"):
    got = attention.attend(q, k, v, mask, implementation="splash")  # as auto resolves on TPU
  want = attention.attend(q, k, v, mask, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert [r.message for r in caplog.records if "multiples of 128" in r.message]
