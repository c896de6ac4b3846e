"""Bad configs end with one line that names the field, before anything compiles."""

import jax
import ml_collections
import pytest

from lm import config as lmc
from lm.config import ConfigError
from lm.train_step import Trainer
from tests.helpers import tiny_config

BAD = [
  ("model.d_model", lambda c: c.model.update(d_model=-8)),
  ("model.num_heads", lambda c: c.model.update(num_heads=5)),
  ("model.activation", lambda c: c.model.update(activation="tanh")),
  ("model.dropout_rate", lambda c: c.model.update(dropout_rate=1.5)),
  ("model.positions", lambda c: c.model.update(positions="alibi")),
  ("optim.name", lambda c: c.optim.update(name="lion")),
  ("optim.schedule", lambda c: c.optim.update(schedule="step")),
  ("train.total_steps", lambda c: c.train.update(total_steps=0)),
  ("train.global_batch_size", lambda c: c.train.update(global_batch_size=6, microbatches=4)),
  ("zero_stage", lambda c: c.update(zero_stage=4)),
  ("mesh.fsdp", lambda c: c.mesh.update(fsdp=0)),
  ("mesh", lambda c: c.mesh.update(data=3, fsdp=1, tensor=1)),
  ("mesh", lambda c: c.mesh.update(data=-1, fsdp=-1)),
  (
    "train.global_batch_size",
    lambda c: c.mesh.update(data=8) or c.train.update(global_batch_size=4),
  ),
  (
    "model.num_heads",
    lambda c: c.mesh.update(fsdp=2, tensor=4) or c.model.update(num_heads=2, d_model=32),
  ),
  ("data.seq_len", lambda c: c.model.update(positions="learned", max_len=8)),
  ("model.enc_layers", lambda c: c.model.update(enc_layers=0)),
  ("mesh.dcn_data", lambda c: c.mesh.update(data=1, fsdp=4, dcn_data=2)),  # one process
  ("train.grad_reduce_dtype", lambda c: c.train.update(grad_reduce_dtype="float16")),
  ("train.sync_every", lambda c: c.train.update(sync_every=-1)),
  ("train.outer_optimizer", lambda c: c.train.update(outer_optimizer="adam")),
  ("train.outer_momentum", lambda c: c.train.update(outer_momentum=1.0)),
]


@pytest.mark.parametrize("field, mutate", BAD, ids=[f for f, _ in BAD])
def test_bad_config_names_the_field_in_one_line(field, mutate):
  cfg = tiny_config()
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  mutate(cfg)
  with pytest.raises(ConfigError) as err:
    Trainer.build(cfg, devices=jax.devices())
  message = str(err.value)
  assert message.startswith(f"config.{field}:"), message
  assert "\n" not in message


def test_unknown_field_is_rejected():
  cfg = tiny_config()
  with pytest.raises(AttributeError):
    cfg.model.d_modle = 3  # locked ConfigDicts refuse misspelt keys


def test_unknown_nested_key_is_rejected_by_validate():
  cfg = tiny_config().to_dict()
  cfg["optim"]["lr"] = 1e-3  # as a config loaded from JSON could carry it
  with pytest.raises(ConfigError, match=r"^config\.optim\.lr: unknown field; known fields are"):
    lmc.validate(ml_collections.ConfigDict(cfg))


@pytest.mark.parametrize("vocab,tensor", [(62, 4), (62, 1), (130, 2)])
def test_vocab_is_padded_the_same_on_every_mesh(vocab, tensor):
  cfg = tiny_config(vocab_size=vocab)
  cfg.mesh.update(data=1, fsdp=8 // tensor, tensor=tensor)
  run = Trainer.build(cfg, devices=jax.devices())
  padded = 128 if vocab <= 128 else 256  # a multiple of 128: restorable on any tensor size
  assert run.layout.dims.vocab_size == padded
  assert run.layout.abstract_params["embed"]["table"].shape == (padded, cfg.model.d_model)


def test_grouped_query_heads_must_divide_the_query_heads():
  cfg = tiny_config("lm", num_heads=4, num_kv_heads=3)
  with pytest.raises(ConfigError, match="config.model.num_kv_heads: 3 does not divide"):
    lmc.validate(cfg)


def test_kv_heads_the_tensor_axis_does_not_divide_are_replicated_and_said_so():
  from lm.layout import Layout

  cfg = tiny_config("lm", num_heads=4, num_kv_heads=2)
  cfg.mesh.update(data=1, fsdp=1, tensor=4)
  layout = Layout.build(cfg, devices=jax.devices()[:4])
  key = layout.shardings.params["decoder"]["layers"]["self_attn"]["key"]
  query = layout.shardings.params["decoder"]["layers"]["self_attn"]["query"]
  assert "tensor" not in jax.tree.leaves(tuple(key.spec)) and "tensor" in tuple(query.spec)
  (note,) = layout.notes()
  assert "num_kv_heads=2 is not divisible by mesh.tensor=4" in note
  cfg.mesh.tensor = 2
  layout = Layout.build(cfg, devices=jax.devices()[:2])
  assert "tensor" in tuple(layout.shardings.params["decoder"]["layers"]["self_attn"]["key"].spec)
  assert layout.notes() == []
