"""model.loss_chunk: the loss over sequence chunks equals the whole one, gathers the head once,
and holds one chunk's logits."""

import functools
import re
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lm import evaluate, objective
from lm.data.synthetic import random_batch
from lm.layout import Layout
from lm.train_step import Trainer
from tests.helpers import tiny_config
from tests.test_adapt import _teacher

# Both families with what the loss must respect: label smoothing, the padded vocabulary (64 ids
# of 128 rows), a logits bias, tied and untied heads; the LM with grouped-query attention and
# packed rows (two examples each), the translation model unpacked.
FAMILIES = {
  "lm": ("lm", dict(num_kv_heads=2, tie_embeddings=False, label_smoothing=0.1), True),
  "translation": ("translation", dict(logits_bias=True, label_smoothing=0.1), False),
}
STEPS = 2


def _config(family, chunk=0, mesh=(1, 1, 1), stage=0):
  task, model, packed = FAMILIES[family]
  cfg = tiny_config(task, loss_chunk=chunk, **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.data.pack = packed
  cfg.train.microbatches = 2
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6)
  return cfg


def _batch(cfg, seed):
  """random_batch's rows; packed: two examples per row, positions restarting at the second."""
  batch = random_batch(cfg, seed=seed, padding=2, packed=cfg.data.pack)
  if cfg.data.pack:
    half = cfg.data.seq_len // 2 - 1  # uneven halves: a segment crosses a chunk's edge
    for side in ("inputs", "targets") if cfg.task == "translation" else ("targets",):
      segments = batch[side + "_segment_ids"].copy()
      segments[:, half:] *= 2
      positions = np.array(batch[side + "_positions"])
      positions[:, half:] -= half
      batch[side + "_segment_ids"], batch[side + "_positions"] = segments, positions
  return batch


def _devices(cfg):
  return jax.devices()[: cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor]


def _loss_and_grads(cfg):
  layout = Layout.build(cfg, devices=_devices(cfg))

  def loss_fn(p, b):  # a cotangent of 3, not 1: the chunks' backward must scale by it
    loss, counts = objective.training_loss_sums(layout, p, b, None)
    return 3.0 * loss, counts

  with jax.set_mesh(layout.mesh):
    (loss, counts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      layout.init_params(), layout.shard_batch(_batch(cfg, seed=1))
    )
  return float(loss), [float(c) for c in counts], jax.device_get(grads)


@functools.cache
def _whole_loss_and_grads(family):
  return _loss_and_grads(_config(family))


def _assert_close_per_tensor(got, expected):
  """rtol 1e-5 of each tensor's scale: the chunks' sums are added in another order."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-9, np.abs(a - b).max()


@pytest.mark.parametrize(
  "family,chunk",
  [("lm", 5), ("lm", 16), ("translation", 5), ("translation", 8)],  # 5: pads the last chunk
)
def test_chunked_loss_counts_and_gradients_equal_the_whole_loss(family, chunk):
  loss, counts, grads = _loss_and_grads(_config(family, chunk))
  whole_loss, whole_counts, whole_grads = _whole_loss_and_grads(family)
  np.testing.assert_allclose(loss, whole_loss, rtol=1e-5)
  assert counts == whole_counts  # target tokens and correct tokens, exactly
  _assert_close_per_tensor(grads, whole_grads)


def _train(cfg, teacher_seed=None):
  devices = _devices(cfg)
  teacher = None if teacher_seed is None else _teacher(cfg, devices)
  run = Trainer.build(cfg, devices=devices, teacher=teacher)
  state, step = run.init_state(), run.compile_train_step()
  metrics = []
  for seed in range(STEPS):
    state, m = step(state, run.layout.shard_batch(_batch(cfg, seed)))
    metrics.append([float(m[k]) for k in ("loss", "accuracy", "tokens")])
  return metrics, jax.device_get(state.params)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_train_step_on_2x2x2_zero3_matches_one_device_unchunked(family):
  """ZeRO-3 (the head's weights gathered over fsdp) with the vocabulary split over tensor."""
  metrics, params = _train(_config(family, chunk=5, mesh=(2, 2, 2), stage=3))
  expected_metrics, expected_params = _train(_config(family))
  np.testing.assert_allclose(metrics, expected_metrics, rtol=1e-5)
  # Adam turns rounding noise on near-zero gradients into small updates: 0.5% of a step (lr 1e-3).
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 5e-6, np.abs(a - b).max()


def test_chunked_distillation_matches_unchunked():
  """The teacher's logits are computed chunk by chunk from its hidden states and head too."""
  cfg = _config("translation", chunk=5, mesh=(1, 2, 2), stage=3)
  cfg.train.update(distill_weight=0.5, distill_temperature=2.0)
  metrics, params = _train(cfg, teacher_seed=7)
  cfg.model.loss_chunk, cfg.zero_stage = 0, 0
  cfg.mesh.update(fsdp=1, tensor=1)
  expected_metrics, expected_params = _train(cfg, teacher_seed=7)
  np.testing.assert_allclose(metrics, expected_metrics, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 5e-6, np.abs(a - b).max()


def test_evaluation_chunked_on_2x2x2_zero3_equals_one_device_whole():
  """Evaluation runs outside the step's region: the partitioner gathers the tied head."""
  results = {}
  for chunk, mesh, stage in ((0, (1, 1, 1), 0), (5, (2, 2, 2), 3)):
    cfg = _config("lm", chunk, mesh, stage)
    cfg.model.tie_embeddings = True
    layout = Layout.build(cfg, devices=_devices(cfg))
    rows = _batch(cfg, seed=3)
    tokenizer = types.SimpleNamespace(vocab_size=64, pad_id=0, bos_id=2, eos_id=3)
    data = types.SimpleNamespace(eval=rows, tokenizer=tokenizer)
    results[chunk] = evaluate.Evaluator(layout, data).teacher_forced(layout.init_params())
  for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
    np.testing.assert_allclose(results[5][key], results[0][key], rtol=1e-5)


def _executed_all_gathers(jaxpr, times=1) -> int:
  """all_gather equations run per call: those inside a scan count once per iteration."""
  count = 0
  for eqn in jaxpr.eqns:
    inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
    count += times * (eqn.primitive.name == "all_gather")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _executed_all_gathers(sub, inner)
  return count


def test_zero3_gathers_the_tied_head_once_per_microbatch_whatever_the_chunk_count():
  counts = {}
  for chunk in (0, 8, 4, 2):  # 1, 2, 4 and 8 chunks of 16 positions
    cfg = _config("translation", chunk, mesh=(1, 4, 1), stage=3)
    run = Trainer.build(cfg, devices=_devices(cfg))
    with jax.set_mesh(run.layout.mesh):
      jaxpr = jax.make_jaxpr(run.train_step)(run.abstract_state(), run.layout.abstract_batch())
    counts[chunk] = _executed_all_gathers(jaxpr.jaxpr)
  assert counts[0] > 0 and len(set(counts.values())) == 1, counts


def _all_gathers_in_hlo(hlo: str, trip_count: int) -> tuple[int, list[int]]:
  """(all-gathers in the compiled program, those in the body of each of its loops of
  `trip_count` iterations)."""
  computations = {b.split(" ", 2)[int(b.startswith("ENTRY"))]: b for b in hlo.split("\n\n")}
  bodies = re.findall(rf'body=(%[\w.\-]+).*?known_trip_count":{{"n":"{trip_count}"', hlo)
  return hlo.count(" all-gather("), [computations[b].count(" all-gather(") for b in bodies]


def test_zero3_evaluation_gathers_the_tied_head_outside_the_chunk_loop():
  """In evaluation the partitioner places the gathers: the compiled program has as many for 4
  and 8 chunks as for none, and none in the chunk loop's body."""
  counts = {}
  for chunk, chunks in ((0, 0), (4, 4), (2, 8)):
    cfg = _config("lm", chunk, mesh=(1, 4, 2), stage=3)
    cfg.model.tie_embeddings = True
    layout = Layout.build(cfg, devices=_devices(cfg))
    nll = jax.jit(lambda p, b, layout=layout: objective.nll_sums(layout, p, b))
    with jax.set_mesh(layout.mesh):
      compiled = nll.lower(layout.placed_params(), layout.abstract_batch(8)).compile()
    counts[chunk], in_chunk_loops = _all_gathers_in_hlo(compiled.as_text(), chunks)
    assert chunks == 0 or in_chunk_loops == [0], in_chunk_loops  # one loop, no gather in it
  assert counts[0] > 0 and len(set(counts.values())) == 1, counts


def loss_temp_bytes(cfg, devices) -> int:
  """Temp bytes of the loss's forward and backward alone, compiled against abstract inputs:
  the final hidden states [rows, seq_len, d_model] in, their gradient and the head's out."""
  layout = Layout.build(cfg, devices=devices)
  rows, length = cfg.train.global_batch_size, cfg.data.seq_len
  hidden = jax.ShapeDtypeStruct((rows, length, cfg.model.d_model), jnp.float32)

  def loss(params, hidden, batch):
    outputs = (hidden, layout.head(params))
    return objective.output_loss_sums(layout, outputs, batch, cfg.model.label_smoothing)[0]

  with jax.set_mesh(layout.mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      layout.placed_params(), hidden, layout.abstract_batch()
    )
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_temp_bytes_fall_by_the_chunk_count():
  """4 rows x 512 positions x 4096 ids: the whole logits are 32 MiB; chunks of 32, 2 MiB."""
  cfg = tiny_config("lm", vocab_size=4096, d_model=64, max_len=512, label_smoothing=0.1)
  cfg.data.seq_len, cfg.train.global_batch_size = 512, 4
  devices = jax.devices()[:1]
  whole = loss_temp_bytes(cfg, devices)
  cfg.model.loss_chunk = 32
  chunked = loss_temp_bytes(cfg, devices)
  assert whole >= 32 * 2**20 and chunked * 8 <= whole, (whole, chunked)
