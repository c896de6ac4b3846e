"""The memory model (lm/parallel/memory.py) against compiled steps, and `bench --plan`.

Formula configs are not the calibration grid's points (docs/parallelism.md, "Memory model"):
other depths, lengths and batch sizes, so they check the fit, not reproduce it.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import memory_calibration, plan
from lm.config import ConfigError
from lm.parallel import memory
from lm.train_step import Trainer
from tests.helpers import ROOT, tiny_config

WIDE = dict(vocab_size=1024, d_model=256, num_heads=4, mlp_dim=1024, max_len=256)
FORMULA_CONFIGS = {
  # decoder-only, gelu, learned positions
  "lm": ("lm", dict(WIDE, dec_layers=6), 128, 16),
  # encoder-decoder (cross-attention), relu, sinusoids
  "translation": ("translation", dict(WIDE, enc_layers=3, dec_layers=2), 96, 8),
  # grouped-query attention, swiglu, rmsnorm, rotary
  "gqa_swiglu": ("lm", dict(WIDE, dec_layers=3, **memory_calibration.GQA), 192, 8),
}


def _config(name: str, remat: str):
  task, model, length, rows = FORMULA_CONFIGS[name]
  cfg = tiny_config(task, **model, remat=remat)
  cfg.data.seq_len, cfg.train.global_batch_size = length, rows
  return cfg


def predicted_temp(trainer: Trainer) -> dict:
  """The formula's temp terms for a built trainer, as experiments.bench prints them."""
  return memory.layout_formula(trainer.layout, trainer.trainable)[2]


@pytest.mark.parametrize("remat", ["none", "save_dots", "full"])
@pytest.mark.parametrize("name", sorted(FORMULA_CONFIGS))
def test_temp_bytes_match_the_activation_formula(name, remat):
  trainer = Trainer.build(_config(name, remat), devices=jax.devices()[:1])
  measured = trainer.compile_train_step().memory_analysis().temp_size_in_bytes
  terms = predicted_temp(trainer)
  # Activations dominate: the check is on them, not on the optimizer's fixed temporaries.
  assert terms["layers"] + terms["working"] + terms["loss"] > 0.5 * terms["total"]
  assert terms["total"] == pytest.approx(measured, rel=0.10), (terms, measured)


def _stand_in_lm():
  """GPT-2's shape at a CPU-compilable size."""
  cfg = tiny_config(
    "lm", vocab_size=2048, d_model=256, num_heads=8, mlp_dim=1024, dec_layers=4, max_len=128
  )
  cfg.model.activation = "gelu"
  cfg.data.seq_len, cfg.train.global_batch_size = 128, 64
  return cfg


def test_plan_top_option_fits_and_matches_its_compile():
  cfg = _stand_in_lm()
  chip, devices = memory.target("", 8, "96MiB")
  options, valid = plan.plan(cfg, chip, devices, headroom=0.1)
  assert valid > len(options) > 0  # some options do not fit 96 MiB, some do
  assert all(o.total_bytes <= 0.9 * 96 * 2**20 for o in options)
  # Best first: an option that recomputes (save_dots, full) ranks below its twin that keeps
  # everything (remat none, same mesh, stage and microbatches) wherever that twin fits.
  rank = {o.label(): i for i, o in enumerate(options)}
  twins = [(rank[o.label().replace(f"remat {o.remat}", "remat none")], i)
           for i, o in enumerate(options) if o.remat != "none"
           and o.label().replace(f"remat {o.remat}", "remat none") in rank]  # fmt: skip
  assert twins and all(keeps < recomputes for keeps, recomputes in twins)
  checked = plan.verify(options[0])
  assert checked["ratio"] == pytest.approx(1.0, abs=0.10), checked
  # ZeRO-3 with tensor parallelism: the gathered parameters, sharded gradients, heads split.
  sharded = next(o for o in options if o.cfg.zero_stage == 3 and o.mesh_shape["tensor"] == 2)
  checked = plan.verify(sharded)
  assert checked["ratio"] == pytest.approx(1.0, abs=0.10), (sharded.label(), checked)


def test_plan_on_a_v4_slice_matches_its_compile(tmp_path):
  """A translation model on v4-32 (16 chips): 16 CPU host devices in a process of its own."""
  out = tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [
    sys.executable,
    "-m",
    "experiments.bench",
    "--plan",
    "--config=experiments/wmt_ende.py:big",
    "--chip=v4-32",
    "--device_memory=160MiB",
    "--verify",
    "--host_devices=16",
    f"--json={out}",
    "--top=3",
    *(
      f"--config.{k}={v}"
      for k, v in dict(
        **{"model.d_model": 128, "model.mlp_dim": 512, "model.num_heads": 8},
        **{"model.enc_layers": 2, "model.dec_layers": 2, "model.vocab_size": 1024},
        **{"data.seq_len": 64, "model.max_len": 64, "train.global_batch_size": 64},
      ).items()
    ),
  ]
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 16 and result["options"]
  assert result["verify"]["ratio"] == pytest.approx(1.0, abs=0.10), result["verify"]


def test_plan_input_errors_are_one_line():
  with pytest.raises(ConfigError, match="--chip: 'v9' is unknown"):
    memory.target("v9", 8, "")
  with pytest.raises(ConfigError, match="v4-32 has 16 chips"):
    memory.target("v4-32", 8, "")
  with pytest.raises(ConfigError, match="--device_memory: 'lots'"):
    memory.target("h100", 8, "lots")
  chip, devices = memory.target("v5e-4", 0, "")
  assert (devices, chip.memory_bytes) == (4, 16 * 2**30)
  chip, devices = memory.target("", 8, "1MiB")
  with pytest.raises(ConfigError, match=r"no option fits .* needs [\d.]+ GiB: use devices with"):
    plan.plan(_stand_in_lm(), chip, devices, headroom=0.1)


def test_remat_adds_its_recomputation_to_the_step_flops():
  cfg = _stand_in_lm()
  shapes = plan.ModelShapes(cfg, "cpu")
  shape = {"stage": 1, "data": 1, "fsdp": 8, "tensor": 1}
  flops = {}
  for remat in ("none", "save_dots", "full"):
    c = cfg.copy_and_resolve_references()
    c.model.remat = remat
    flops[remat] = memory.recompute_flops(c, shapes.dims(c, shape))
  model = shapes.flops(cfg, 1)
  assert flops["none"] == 0 < flops["save_dots"] < flops["full"] < model / 2
