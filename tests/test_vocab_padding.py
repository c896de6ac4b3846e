"""The embedding rows padded for the mesh (or past the tokenizer) change no loss."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import objective
from lm.data.synthetic import random_batch
from lm.models.loss import cross_entropy_sums
from lm.models.transformer import build_model
from lm.train_step import Trainer
from tests.helpers import tiny_config


def test_loss_with_vocab_padding_equals_the_unpadded_model():
  cfg = tiny_config(vocab_size=100, label_smoothing=0.1)
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  assert run.layout.dims.vocab_size == 128 and run.layout.vocab_limit == 100
  params = jax.device_get(run.init_state().params)
  batch = random_batch(cfg, seed=3, padding=2)

  # The same model with exactly 100 embedding rows: the padded table's first 100 rows.
  unpadded_dims = dataclasses.replace(run.layout.dims, vocab_size=100)
  with nnx.use_eager_sharding(False):
    model = build_model(cfg.task, unpadded_dims, cfg.seed)
  graphdef, state = nnx.split(model, nnx.Param)
  unpadded = jax.tree.map(lambda x: x, params)
  unpadded["embed"]["table"] = params["embed"]["table"][:100]
  nnx.replace_by_pure_dict(state, unpadded)
  logits = nnx.merge(graphdef, state)(batch)
  assert logits.shape[-1] == 100
  weights = (batch["targets"] > 0).astype(jnp.float32)
  expected = cross_entropy_sums(logits, batch["targets"], weights, 0.1)

  with jax.set_mesh(run.layout.mesh):
    loss, (tokens, correct) = jax.jit(functools.partial(objective.training_loss_sums, run.layout))(
      params, run.layout.shard_batch(batch), None
    )
  np.testing.assert_allclose(float(loss), float(expected[0]), rtol=1e-6)
  assert float(tokens) == float(expected[1]) and float(correct) == float(expected[2])
