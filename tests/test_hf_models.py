"""Hugging Face models imported (hf:DIR) and exported (--format=hf), held to transformers itself:
random-weight models built from a config and saved with save_pretrained, nothing downloaded."""

import json
import os
import types

import jax
import numpy as np
import pytest
from safetensors import safe_open

from lm import config as lmc
from lm import decode, inference
from lm.checkpoint import meta_config, meta_tokenizer
from lm.data.synthetic import random_batch
from lm.hf import architectures, weights
from lm.hf import models as hf_models
from lm.hf import tokenizer as hf_tokenizer
from lm.train_step import Trainer
from tests import hf_fixtures
from tests.hf_fixtures import torch, transformers

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

# At least three configs per architecture: heads vs KV heads, tied vs untied, head_dim, biases,
# activations.
CONFIGS = {
  "gpt2-tied": ("gpt2", {}),
  "gpt2-untied-relu": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu")),
  "gpt2-2heads-erf": ("gpt2", dict(n_head=2, n_inner=48, activation_function="gelu")),
  "llama-gqa": ("llama", {}),
  "llama-mha-tied-headdim": (
    "llama",
    dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=16, rope_theta=500.0),
  ),
  "llama-mqa": ("llama", dict(num_key_value_heads=1, rms_norm_eps=1e-5, num_hidden_layers=3)),
  "mistral": ("mistral", dict(num_key_value_heads=1)),
  "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True, eos_token_id=2)),
  "marian-swish": ("marian", {}),
  "marian-erf-unscaled": (
    "marian",
    dict(
      activation_function="gelu",
      scale_embedding=False,
      encoder_attention_heads=2,
      decoder_attention_heads=2,
    ),
  ),
  "marian-relu-uneven": (
    "marian",
    dict(activation_function="relu", encoder_layers=1, decoder_layers=3),
  ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, transformers' model), built once each."""
  built = {}

  def get(name):
    if name not in built:
      kind, options = CONFIGS[name]
      directory = tmp_path_factory.mktemp(name)
      built[name] = directory, hf_fixtures.save_model(kind, directory, **options)
    return built[name]

  return get


def _mesh(cfg, mesh=(1, 1, 1), stage=0):
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  return cfg


def _import(directory, mesh=(1, 1, 1), stage=0):
  """(layout, params, tokenizer) of hf:directory on a mesh of that many devices."""
  spec = f"hf:{directory}"
  cfg = _mesh(meta_config(inference.source_meta(spec)), mesh, stage)
  devices = jax.devices()[: int(np.prod(mesh))]
  layout, params, tokenizer, _ = inference.restore_export(spec, devices, cfg)
  return layout, params, tokenizer


def _padded_batch(layout, tokenizer, seed=0, rows=4) -> dict:
  """`rows` (4 or 8) rows of random ids of different lengths (the rest padding, marked by
  segment ids)."""
  rng = np.random.RandomState(seed)
  shapes = {
    "inputs": (12, (12, 9, 5, 2, 1, 7, 12, 3)),
    "targets": (16, (16, 11, 7, 3, 1, 2, 9, 16)),
  }
  sides = ("inputs", "targets") if layout.cfg.task == "translation" else ("targets",)
  batch = {}
  for side in sides:
    width, lengths = shapes[side]
    batch[side] = rng.randint(0, tokenizer.vocab_size, size=(rows, width)).astype(np.int32)
    segments = np.arange(width) < np.array(lengths[:rows])[:, None]
    batch[side + "_segment_ids"] = segments.astype(np.int32)
  return batch


def _logits(layout, params, batch):
  with jax.set_mesh(layout.mesh):
    forward = jax.jit(layout.logits)
    out = forward(params, layout.shard_batch(batch))
  return np.asarray(jax.device_get(out))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(saved, name):
  directory, theirs = saved(name)
  layout, params, tokenizer = _import(directory)
  batch = _padded_batch(layout, tokenizer)
  ours = _logits(layout, params, batch)[..., : tokenizer.vocab_size]
  expected = hf_fixtures.logits(theirs, batch, layout.cfg.model.start_id)
  real = batch["targets_segment_ids"].astype(bool)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)
  assert np.abs(expected[real]).max() > 0.1  # the comparison is not between near-zeros


def _hf_generate(theirs, **kwargs):
  with torch.no_grad():
    return theirs.generate(**kwargs, do_sample=False).numpy()


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa", "qwen2-bias"])
def test_greedy_continuations_equal_generate(saved, name):
  directory, theirs = saved(name)
  layout, params, tokenizer = _import(directory)
  options = decode.DecodeOptions(temperature=0.0, max_len=24)
  decoder = decode.Decoder(layout, params, tokenizer, options, batch_size=8)
  rng = np.random.RandomState(1)
  prompts = [list(rng.randint(0, tokenizer.vocab_size, size=n)) for n in (1, 2, 3, 4, 5, 6, 7, 8)]
  prompts[2][0] = 0  # id 0 is a real token (GPT-2's "!"), not padding
  new = 10
  rows = decoder.decode_ids(prompts, caps=[new] * len(prompts))
  start, banned = layout.cfg.model.start_id, decoder.specials.banned
  for prompt, row in zip(prompts, rows):
    ours = decode.until_end(row[len(prompt) :], tokenizer.eos_id)
    out = _hf_generate(
      theirs,
      input_ids=torch.tensor([[start, *prompt]]),
      max_new_tokens=new,
      eos_token_id=tokenizer.eos_id,
      pad_token_id=tokenizer.eos_id,
      suppress_tokens=list(banned) or None,
    )[0, len(prompt) + 1 :]
    assert ours == decode.until_end(out, tokenizer.eos_id), prompt


@pytest.mark.parametrize("name", ["marian-swish", "marian-relu-uneven"])
def test_beam_4_translations_equal_generate(saved, name):
  """Beam 4 without a length penalty (alpha 0 = transformers' length_penalty 0: both rank by
  the summed log-probability); both stop when no live beam can beat the finished ones, and at
  the length cap keep the best hypotheses whole."""
  directory, theirs = saved(name)
  layout, params, tokenizer = _import(directory)
  options = decode.DecodeOptions(beam_size=4, alpha=0.0, max_len=12, max_len_a=0, max_len_b=12)
  decoder = decode.Decoder(layout, params, tokenizer, options, batch_size=8)
  rng = np.random.RandomState(2)
  eos = tokenizer.eos_id
  sources = [list(rng.randint(2, tokenizer.vocab_size - 1, size=n)) + [eos] for n in range(2, 10)]
  rows = decoder.decode_ids(sources)
  for source, row in zip(sources, rows):
    out = _hf_generate(
      theirs,
      input_ids=torch.tensor([source]),
      num_beams=4,
      length_penalty=0.0,
      max_new_tokens=12,
      bad_words_ids=[[b] for b in decoder.specials.banned],
      forced_eos_token_id=None,  # Marian's default forces EOS at the cap; zerolm does not
    )[0, 1:]  # after the decoder start
    assert decode.until_end(row, eos) == decode.until_end(out, eos), source


def _llama_cfg(saved):
  directory, _ = saved("llama-gqa")
  return directory, meta_config(inference.source_meta(f"hf:{directory}"))


@pytest.mark.parametrize("mesh,stage", [((2, 2, 2), 0), ((2, 2, 2), 3), ((1, 8, 1), 3)])
def test_a_sharded_import_gives_one_devices_logits(saved, mesh, stage):
  directory, _ = _llama_cfg(saved)
  single, single_params, tokenizer = _import(directory)
  batch = _padded_batch(single, tokenizer, rows=8)
  expected = _logits(single, single_params, batch)
  layout, params, _ = _import(directory, mesh, stage)
  if stage == 3:  # stored sharded over fsdp: no device holds a whole kernel
    query = params["decoder"]["layers"]["self_attn"]["query"]
    assert query.addressable_shards[0].data.size < query.size // 2
  np.testing.assert_allclose(_logits(layout, params, batch), expected, atol=1e-5, rtol=0)


def _lora_losses(directory, cfg, mesh, stage, steps=3):
  cfg = _mesh(cfg, mesh, stage)
  cfg.model.update(dtype="float32", lora_rank=4, lora_targets=".")
  cfg.train.update(global_batch_size=8, microbatches=1)
  cfg.data.update(seq_len=16, pack=False)
  cfg.optim.update(learning_rate=1e-2, schedule="constant", warmup_steps=0)
  devices = jax.devices()[: int(np.prod(mesh))]
  _, base, _, _ = inference.restore_model(f"hf:{directory}", cfg, "train.init_from", devices)
  run = Trainer.build(cfg, devices=devices)
  state = run.init_state(base)
  step = run.compile_train_step()
  losses = []
  for seed in range(steps):
    batch = random_batch(cfg, seed=seed, padding=3)
    state, m = step(state, run.layout.shard_batch(batch))
    losses.append(float(m["loss"]))
  return losses


def test_lora_fine_tuning_an_import_is_sharded_like_one_device(saved):
  """On (2, 2, 2) at ZeRO-3: every axis, and the stage that shards most. The import on
  (1, 8, 1) at ZeRO-3 is held to one device's logits above, LoRA on (1, 8, 1) to one device's
  losses by tests/test_adapt.py (ZeRO-1), and the student below trains LoRA on the import
  there."""
  directory, cfg = _llama_cfg(saved)
  reference = _lora_losses(directory, cfg, (1, 1, 1), 0)
  assert reference[-1] < reference[0]  # it trains
  np.testing.assert_allclose(_lora_losses(directory, cfg, (2, 2, 2), 3), reference, rtol=1e-5)


def test_a_student_distils_from_an_imported_teacher(saved):
  """An imported model as train.teacher, and as the LoRA student's base (LoRA starts at zero,
  so the student is the teacher): the first step's KL is 0, its loss half the plain one."""
  from lm.train import load_teacher

  directory, cfg = _llama_cfg(saved)
  spec = f"hf:{directory}"
  cfg = _mesh(cfg, (1, 8, 1), 3)
  cfg.model.update(lora_rank=4, lora_targets=".")
  cfg.train.update(global_batch_size=8, teacher=spec, distill_weight=0.5, distill_temperature=2.0)
  cfg.data.update(seq_len=16, pack=False)
  _, base, tokenizer, _ = inference.restore_model(spec, cfg, "train.init_from")
  first_loss = {}
  for weight in (0.5, 0.0):
    cfg.train.distill_weight = weight
    data = types.SimpleNamespace(tokenizer=tokenizer)
    teacher = load_teacher(cfg, data, types.SimpleNamespace(info=lambda line: None))
    assert (teacher is None) == (weight == 0)
    run = Trainer.build(cfg, teacher=teacher)
    _, m = run.compile_train_step()(run.init_state(base), run.layout.shard_batch(random_batch(cfg)))
    first_loss[weight] = float(m["loss"])
  np.testing.assert_allclose(first_loss[0.5], 0.5 * first_loss[0.0], rtol=1e-5)
  other = types.SimpleNamespace(
    tokenizer=types.SimpleNamespace(fingerprint=lambda: "x", vocab_size=9)
  )
  cfg.train.distill_weight = 0.5
  with pytest.raises(lmc.ConfigError, match="config.train.teacher: its tokenizer"):
    load_teacher(cfg, other, None)


def _tensors(directory):
  """{name: shape} over a checkpoint's safetensors files."""
  out = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(".safetensors"):
      with safe_open(os.path.join(directory, file), "np") as f:
        out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
  return out


@pytest.mark.parametrize("name", ["gpt2-untied-relu", "llama-gqa", "qwen2-bias", "marian-swish"])
def test_export_round_trip(saved, name, tmp_path):
  """Import, export, import: bitwise the same parameters; transformers loads the export with
  the original's logits, and its state dict has exactly the original's keys and shapes."""
  directory, theirs = saved(name)
  layout, params, tokenizer = _import(directory)
  out = tmp_path / "export"
  hf_models.export(str(out), layout, params, tokenizer)
  again, params_again, tokenizer_again = _import(out)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_again), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert tokenizer_again.fingerprint() == tokenizer.fingerprint()
  assert _tensors(out) == _tensors(directory)
  reloaded = type(theirs).from_pretrained(out).eval()
  batch = _padded_batch(layout, tokenizer)
  start = layout.cfg.model.start_id
  real = batch["targets_segment_ids"].astype(bool)
  np.testing.assert_allclose(
    hf_fixtures.logits(reloaded, batch, start)[real],
    hf_fixtures.logits(theirs, batch, start)[real],
    atol=1e-5,
    rtol=0,
  )


def test_export_refuses_options_without_an_equivalent(saved):
  directory, _ = saved("llama-gqa")
  cfg = meta_config(inference.source_meta(f"hf:{directory}"))
  cfg.model.update(norm="layernorm", logits_bias=True)
  with pytest.raises(lmc.ConfigError, match="model.norm='layernorm'.*model.logits_bias") as e:
    architectures.architecture_of(cfg)
  assert "\n" not in str(e.value)


# -- bad input: one line naming the file or tensor ------------------------------------------


def _error(spec, match):
  with pytest.raises(lmc.ConfigError, match=match) as error:
    meta = inference.source_meta(spec)
    cfg = _mesh(meta_config(meta))
    inference.restore_export(spec, jax.devices()[:1], cfg)
  assert "\n" not in str(error.value), str(error.value)
  return str(error.value)


def _copy(saved, tmp_path, name="gpt2-tied"):
  import shutil

  directory, _ = saved(name)
  shutil.copytree(directory, tmp_path / "copy")
  return tmp_path / "copy"


def test_a_directory_without_config_json(tmp_path):
  assert str(tmp_path) in _error(f"hf:{tmp_path}", "has no config.json")


def test_an_unknown_model_type(saved, tmp_path):
  copy = _copy(saved, tmp_path)
  config = json.loads((copy / "config.json").read_text())
  hf_fixtures.write_json(copy / "config.json", dict(config, model_type="bert"))
  assert "config.json: model_type 'bert'" in _error(f"hf:{copy}", "not supported")


def test_an_option_not_implemented(saved, tmp_path):
  copy = _copy(saved, tmp_path, "llama-gqa")
  config = json.loads((copy / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
  hf_fixtures.write_json(copy / "config.json", config)
  _error(f"hf:{copy}", "config.json: rope_parameters.rope_type 'yarn' is not implemented")


def _rewrite_tensors(copy, change):
  from safetensors.numpy import save_file

  path = copy / "model.safetensors"
  with safe_open(str(path), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  save_file(change(tensors), str(path), {"format": "pt"})


def test_a_missing_tensor(saved, tmp_path):
  copy = _copy(saved, tmp_path)
  _rewrite_tensors(copy, lambda t: {k: v for k, v in t.items() if k != "transformer.h.1.ln_2.bias"})
  _error(f"hf:{copy}", "no tensor 'transformer.h.1.ln_2.bias'")


def test_a_tensor_of_the_wrong_shape(saved, tmp_path):
  copy = _copy(saved, tmp_path)
  name = "transformer.h.0.mlp.c_fc.weight"
  _rewrite_tensors(copy, lambda t: {**t, name: t[name][:, :-1]})
  _error(f"hf:{copy}", f"tensor '{name}' has shape \\[32, 127\\].*needs \\[32, 128\\]")


def test_a_tokenizer_larger_than_the_embedding(saved, tmp_path):
  copy = _copy(saved, tmp_path)
  config = json.loads((copy / "config.json").read_text())
  hf_fixtures.write_json(copy / "config.json", dict(config, vocab_size=config["vocab_size"] - 5))
  _error(f"hf:{copy}", "the tokenizer has .* ids but the embedding only")


def test_a_hub_id_offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  message = _error("hf:Helsinki-NLP/opus-mt-en-de", "cannot download 'Helsinki-NLP/opus-mt-en-de'")
  assert "hf:/path/to/its/directory" in message


def test_gpt2s_original_tensor_names_without_the_prefix(saved, tmp_path):
  """openai-community/gpt2 stores wte.weight, h.0...., not transformer.wte.weight."""
  directory, theirs = saved("gpt2-tied")
  copy = _copy(saved, tmp_path)
  _rewrite_tensors(copy, lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})
  layout, params, tokenizer = _import(copy)
  batch = _padded_batch(layout, tokenizer)
  real = batch["targets_segment_ids"].astype(bool)
  expected = hf_fixtures.logits(theirs, batch, layout.cfg.model.start_id)
  ours = _logits(layout, params, batch)[..., : tokenizer.vocab_size]
  np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", sorted(architectures.DEFAULTS))
def test_missing_config_json_fields_mean_transformers_defaults(kind):
  config_cls = getattr(transformers, hf_fixtures.MODELS[kind][0])
  theirs = config_cls().to_dict()
  checked = 0
  for field, ours in architectures.DEFAULTS[kind].items():
    if ours is None and field in ("num_key_value_heads", "head_dim"):
      continue  # derived (num_heads, hidden / heads), as transformers derives them
    if kind == "qwen2" and field == "sliding_window":
      continue  # Qwen2Config() shows None without use_sliding_window; 4096 is its argument's
    if field in theirs:
      assert theirs[field] == ours, (field, theirs[field], ours)
      checked += 1
  assert checked >= 10


REFUSED = [
  ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
  ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
  ("gpt2", dict(activation_function="quick_gelu"), "activation_function 'quick_gelu'"),
  ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
  ("llama", dict(attention_bias=True), "attention_bias true"),
  ("llama", dict(mlp_bias=True), "mlp_bias true"),
  ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling 'linear'"),
  ("mistral", dict(sliding_window=16, max_position_embeddings=64), "sliding_window 16"),
  (
    "qwen2",
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "sliding_window",
  ),
  ("marian", dict(decoder_ffn_dim=32), "decoder_ffn_dim differs"),
  ("marian", dict(share_encoder_decoder_embeddings=False), "share_encoder_decoder_embeddings"),
  ("marian", dict(tie_word_embeddings=False), "tie_word_embeddings false"),
  ("bert", {}, "model_type 'bert' is not supported"),
]


@pytest.mark.parametrize("kind,fields,match", REFUSED, ids=[m for _, _, m in REFUSED])
def test_config_json_fields_not_implemented_are_one_line_errors(kind, fields, match):
  hf = dict(model_type=kind, **hf_fixtures.BASE.get(kind, {}), bos_token_id=1, eos_token_id=2)
  hf.update(fields)
  with pytest.raises(lmc.ConfigError, match=match) as error:
    architectures.model_config(hf, "/ckpt")
  assert str(error.value).startswith("/ckpt/config.json: ") and "\n" not in str(error.value)


def test_what_transformers_ignores_or_allows_is_accepted():
  """Qwen2 with use_sliding_window but no layer past max_window_layers slides nothing."""
  hf = dict(model_type="qwen2", **hf_fixtures.BASE["qwen2"], eos_token_id=2)
  hf.update(use_sliding_window=True, sliding_window=16, max_window_layers=2)
  assert architectures.model_config(hf, "/ckpt").model.qkv_bias
  marian = dict(model_type="marian", **hf_fixtures.BASE["marian"], normalize_before=True)
  assert architectures.model_config(marian, "/ckpt").model.norm_position == "post"


def test_decodings_special_ids_come_from_the_tokenizer():
  def ids(pad, eos):
    return types.SimpleNamespace(pad_id=pad, eos_id=eos)

  gpt2 = decode.Specials.of(ids(None, 50256), start_id=50256)  # BOS = EOS, no pad
  assert (gpt2.start, gpt2.eos, gpt2.banned) == (50256, 50256, ())
  marian = decode.Specials.of(ids(58100, 0), start_id=58100)  # pad = decoder start
  assert (marian.start, marian.eos, marian.banned) == (58100, 0, (58100,))
  llama = decode.Specials.of(ids(None, 2), start_id=1)
  assert llama.banned == (1,)
  qwen = decode.Specials.of(ids(2, 2), start_id=2)  # pad = EOS = start: never banned
  assert qwen.banned == ()
  several = types.SimpleNamespace(pad_id=None, eos_id=7, eos_ids=(7, 8, 1))
  llama3 = decode.Specials.of(several, start_id=1)
  assert (llama3.eos, llama3.stops, llama3.banned) == (7, (7, 8, 1), ())


def test_explicit_nulls_are_transformers_none_not_the_default():
  """Mistral v0.2's "sliding_window": null is full attention (accepted on any context), and a
  null bos_token_id falls back to the EOS as the start token."""
  hf = dict(model_type="mistral", **hf_fixtures.BASE["mistral"], eos_token_id=2)
  hf.update(sliding_window=None, max_position_embeddings=32768, bos_token_id=None)
  m = architectures.model_config(hf, "/ckpt").model
  assert (m.max_len, m.start_id) == (32768, 2)
  del hf["sliding_window"]  # absent: MistralConfig's 4096, shorter than the context
  with pytest.raises(lmc.ConfigError, match="sliding_window 4096"):
    architectures.model_config(hf, "/ckpt")


def test_a_zerolm_marian_style_model_exports_its_embedding_scale():
  """embed_scale "auto" scales with sinusoids: the export must say scale_embedding."""
  cfg = lmc.translation_defaults()
  cfg.model.update(
    norm_position="post", sinusoid="marian", logits_bias=True, norm_eps=1e-5, activation="silu"
  )
  tokenizer = types.SimpleNamespace(bos_id=None, eos_id=0, eos_ids=(0,), pad_id=7)
  assert cfg.model.embed_scale == "auto"
  assert architectures.config_json(cfg, tokenizer)["scale_embedding"] is True
  cfg.model.embed_scale = "none"
  assert architectures.config_json(cfg, tokenizer)["scale_embedding"] is False


def test_generation_configs_end_ids_stop_too(saved, tmp_path):
  copy = _copy(saved, tmp_path, "llama-gqa")
  hf_fixtures.write_json(copy / "generation_config.json", {"eos_token_id": [2, 7]})
  tokenizer = meta_tokenizer(inference.source_meta(f"hf:{copy}"))
  assert (tokenizer.eos_id, tokenizer.eos_ids) == (2, (2, 7))
  layout, params, _ = _import(copy)
  out = tmp_path / "export"
  hf_models.export(str(out), layout, params, tokenizer)
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 7]


def test_a_tokenizer_meta_from_before_several_ends_keeps_its_fingerprint(saved):
  directory, _ = saved("gpt2-tied")
  meta = inference.source_meta(f"hf:{directory}")["tokenizer"]
  old = json.loads(json.dumps(meta))
  assert old["specials"].pop("stops") is None
  assert hf_tokenizer.from_meta(old).fingerprint() == hf_tokenizer.from_meta(meta).fingerprint()


def test_tensors_are_read_in_chunks_of_rows_and_cast(tmp_path, monkeypatch):
  """Several openings per tensor (a small chunk) give the tensor safe_open reads, bfloat16
  included."""
  import ml_dtypes
  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  arrays = {
    "bf16": rng.standard_normal((37, 5)).astype(ml_dtypes.bfloat16),
    "f32": rng.standard_normal((9, 2, 3)).astype(np.float32),
    "vector": rng.standard_normal(11).astype(np.float32),
    "empty": np.zeros((0, 4), np.float32),
  }
  save_file(arrays, str(tmp_path / "model.safetensors"), {"format": "pt"})
  monkeypatch.setattr(weights, "READ_CHUNK_BYTES", 40)  # 2 rows of bf16[5] per opening
  files = weights.CheckpointFiles(str(tmp_path))
  for name, expected in arrays.items():
    got = files.read(name)
    assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
    assert got.tobytes() == expected.tobytes(), name


def test_hf_export_refusals_come_before_any_restore(tmp_path):
  """No checkpoint in the workdir: a refusal that comes first is the refusal, not that."""
  with pytest.raises(lmc.ConfigError, match="--export_dtype=int8: transformers has no"):
    inference.export(str(tmp_path), str(tmp_path / "out"), "int8", to="hf")
  with pytest.raises(lmc.ConfigError, match="--output: 'gs://bucket/x': --format=hf writes"):
    inference.export(str(tmp_path), "gs://bucket/x", to="hf")
