"""Loss and schedules against hand computations."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lmc
from lm import optim
from lm.models.loss import cross_entropy_sums


def test_label_smoothed_cross_entropy_matches_hand_computation():
  logits = jnp.asarray([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]])
  targets = jnp.asarray([[0, 1]])
  weights = jnp.asarray([[1.0, 1.0]])
  eps = 0.2
  expected = 0.0
  for row, label in zip([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], [0, 1]):
    log_z = math.log(sum(math.exp(z) for z in row))
    q = [eps / 3 + (1 - eps) * (i == label) for i in range(3)]
    expected += -sum(qi * (z - log_z) for qi, z in zip(q, row))
  total, count, correct = cross_entropy_sums(logits, targets, weights, eps)
  assert float(count) == 2.0 and float(correct) == 1.0
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_weights_exclude_padding_tokens():
  logits = jnp.zeros((1, 2, 4))
  total, count, _ = cross_entropy_sums(logits, jnp.asarray([[1, 0]]), jnp.asarray([[1.0, 0.0]]))
  assert float(count) == 1.0
  np.testing.assert_allclose(float(total), math.log(4), rtol=1e-6)


def _optim_cfg(**kw):
  cfg = lmc.translation_defaults().optim
  cfg.update(kw)
  return cfg


def test_rsqrt_schedule_matches_transformer_formula():
  peak, warmup = 1e-3, 100
  lr = optim.schedule(_optim_cfg(schedule="rsqrt", learning_rate=peak, warmup_steps=warmup), 1000)
  for step in (0, 49, 99, 399, 999):
    n = step + 1
    expected = peak * min(n / warmup, math.sqrt(warmup / max(n, warmup)))
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_schedules_match_formulas(kind):
  peak, warmup, total, end = 2e-3, 10, 110, 0.1
  cfg = _optim_cfg(schedule=kind, learning_rate=peak, warmup_steps=warmup, end_fraction=end)
  lr = optim.schedule(cfg, total)
  np.testing.assert_allclose(float(lr(5)), peak * 5 / warmup, rtol=1e-6)
  for step in (10, 35, 60, 110):
    frac = (step - warmup) / (total - warmup)
    if kind == "cosine":
      expected = peak * ((1 - end) * 0.5 * (1 + math.cos(math.pi * frac)) + end)
    else:
      expected = peak + (peak * end - peak) * frac
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-5)


def test_constant_schedule():
  lr = optim.schedule(_optim_cfg(schedule="constant", learning_rate=3e-4), 100)
  assert float(lr(0)) == pytest.approx(3e-4) and float(lr(77)) == pytest.approx(3e-4)


def test_weight_decay_skips_norms_and_biases():
  params = {"attn": {"query": 1, "query_bias": 1}, "norm": {"scale": 1, "bias": 1}, "embed": 1}
  mask = optim.decay_mask(params)
  assert mask == {
    "attn": {"query": True, "query_bias": False},
    "norm": {"scale": False, "bias": False},
    "embed": True,
  }


def test_ids_past_the_vocab_limit_get_no_probability():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
  padded = logits.at[..., 9:].set(50.0)  # garbage columns that would dominate the softmax
  targets = jnp.asarray(rng.randint(1, 9, size=(2, 5)))
  weights = jnp.ones((2, 5))
  for eps in (0.0, 0.1):
    expected = cross_entropy_sums(logits[..., :9], targets, weights, eps)
    got = cross_entropy_sums(padded, targets, weights, eps, vocab_limit=9)
    for a, b in zip(got, expected):
      np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
