"""Bad configs end with one line that names the field, before anything compiles."""

import os
import subprocess
import sys

import jax
import pytest

from lm.config import ConfigError
from lm.state import Run
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
]


@pytest.mark.parametrize("field, mutate", BAD, ids=[f for f, _ in BAD])
def test_bad_config_names_the_field_in_one_line(field, mutate):
  cfg = tiny_config()
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  mutate(cfg)
  with pytest.raises(ConfigError) as err:
    Run.build(cfg, devices=jax.devices())
  message = str(err.value)
  assert message.startswith(f"config.{field}:"), message
  assert "\n" not in message


def test_unknown_field_is_rejected():
  cfg = tiny_config()
  with pytest.raises(AttributeError):
    cfg.model.d_modle = 3  # locked ConfigDicts refuse misspelt keys


def _run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.run", *args],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )


def test_runner_reports_bad_value_in_one_line_without_traceback(tmp_path):
  result = _run(
    "--config=experiments/demo.py:tiny", f"--workdir={tmp_path}", "--config.model.num_heads=5"
  )
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: config.model.num_heads:"), result.stderr
  assert "Traceback" not in result.stderr


def test_runner_rejects_misspelt_override(tmp_path):
  result = _run(
    "--config=experiments/demo.py:tiny", f"--workdir={tmp_path}", "--config.model.d_modle=3"
  )
  assert result.returncode != 0
  assert "d_modle" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("vocab,tensor", [(62, 4), (62, 1), (130, 2)])
def test_vocab_is_padded_the_same_on_every_mesh(vocab, tensor):
  cfg = tiny_config(vocab_size=vocab)
  cfg.mesh.update(data=1, fsdp=8 // tensor, tensor=tensor)
  run = Run.build(cfg, devices=jax.devices())
  padded = 128 if vocab <= 128 else 256  # a multiple of 128: restorable on any tensor size
  assert run.dims.vocab_size == padded
  assert run.abstract_params["embed"]["table"].shape == (padded, cfg.model.d_model)
