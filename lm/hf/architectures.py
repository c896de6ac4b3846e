"""Hugging Face architectures <-> zerolm models: config.json <-> the model section, and each
checkpoint tensor <-> the parameters it holds.

Supported: `gpt2` (GPT2LMHeadModel), `llama` / `mistral` / `qwen2` (their ForCausalLM) and
`marian` (MarianMTModel). A config.json field that zerolm cannot honour is a one-line error
naming it; so is exporting a model whose options have no equivalent.

Conventions (from transformers' modeling code): torch Linear weights are [out, in], GPT-2's
Conv1D weights [in, out]; GPT-2 fuses query, key and value into c_attn; tied output heads are
not in the state dict; Llama's rotary pairs dims (i, i + head_dim/2), as ours does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ml_collections
import numpy as np

from lm import config as lmc

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of the checkpoint (`name`; "{i}" is the layer of a stacked one) and the
  parameters it holds: `split` turns it (one layer's) into {path: array}, `join` turns those
  back into it. A path's array is one layer's when `layers` > 0 (ours stack them). Split
  arrays may be views (the loader copies only its shards) and may stop short of the parameter
  at the end of a dimension, the rest being zeros (vocab rows padded for the mesh)."""

  name: str
  shape: tuple[int, ...]
  paths: tuple[Path, ...]
  split: Callable[[np.ndarray], dict[Path, np.ndarray]]
  join: Callable[[dict[Path, np.ndarray]], np.ndarray]
  layers: int = 0

  def names(self) -> list[str]:
    return [self.name.format(i=i) for i in range(self.layers)] if self.layers else [self.name]


def _reshaped(name, shape, path, ours, layers=0) -> Tensor:
  """A tensor that is one parameter, reshaped (row-major: no data moves)."""
  return Tensor(
    name,
    tuple(shape),
    (path,),
    lambda x: {path: x.reshape(ours)},
    lambda p: p[path].reshape(shape),
    layers,
  )


def _transposed(name, out_dims, in_dims, path, layers=0) -> Tensor:
  """A torch Linear weight [out, in] holding our kernel [*in_dims, *out_dims]."""
  shape = (math.prod(out_dims), math.prod(in_dims))
  return Tensor(
    name,
    shape,
    (path,),
    lambda x: {path: x.T.reshape(*in_dims, *out_dims)},  # a view: dims split, never merged
    lambda p: np.ascontiguousarray(p[path].reshape(shape[1], shape[0]).T),
    layers,
  )


def _dropped(name, shape, layers=0) -> Tensor:
  """A tensor zerolm has no parameter for because it changes nothing: a key bias adds
  q.b to every score of a query alike, which softmax ignores. Exported as zeros."""
  return Tensor(name, tuple(shape), (), lambda x: {}, lambda p: np.zeros(shape, np.float32), layers)


def _vocab_rows(name, vocab, rows, width, path, transpose=False) -> Tensor:
  """An embedding-like tensor [vocab, width]: ours has `rows` >= vocab rows (padded for the
  mesh with zeros, which split leaves to the loader) and is [width, rows] when `transpose`
  (an untied output head)."""

  def split(x):
    return {path: x.T if transpose else x}

  def join(p):
    x = p[path]
    return np.ascontiguousarray(x[:, :vocab].T) if transpose else x[:vocab]

  return Tensor(name, (vocab, width), (path,), split, join)


def _vocab_bias(name, vocab, rows, path) -> Tensor:
  """Marian's final_logits_bias [1, vocab] (a buffer in the state dict): ours [rows]."""
  return Tensor(
    name,
    (1, vocab),
    (path,),
    lambda x: {path: x.reshape(vocab)},  # padded to rows by the loader
    lambda p: p[path][:vocab].reshape(1, vocab),
  )


def _norm(prefix, path, d, layers=0, bias=True) -> list[Tensor]:
  out = [_reshaped(f"{prefix}.weight", (d,), (*path, "scale"), (d,), layers)]
  if bias:
    out.append(_reshaped(f"{prefix}.bias", (d,), (*path, "bias"), (d,), layers))
  return out


def _attention(prefix, path, dims, layers, names, bias, out_bias) -> list[Tensor]:
  """Separate q/k/v/o Linear projections (Llama's, Marian's)."""
  d, h, g, k = dims.d_model, dims.num_heads, dims.num_kv_heads, dims.head_dim
  q, kk, v, o = names
  out = [
    _transposed(f"{prefix}.{q}.weight", (h, k), (d,), (*path, "query"), layers),
    _transposed(f"{prefix}.{kk}.weight", (g, k), (d,), (*path, "key"), layers),
    _transposed(f"{prefix}.{v}.weight", (g, k), (d,), (*path, "value"), layers),
    _transposed(f"{prefix}.{o}.weight", (d,), (h, k), (*path, "out"), layers),
  ]
  if bias:
    key_bias = (
      _reshaped(f"{prefix}.{kk}.bias", (g * k,), (*path, "key_bias"), (g, k), layers)
      if dims.positions == "rotary" and dims.qkv_bias  # see Attention: rotary keeps Qwen2's
      else _dropped(f"{prefix}.{kk}.bias", (g * k,), layers)
    )
    out += [
      _reshaped(f"{prefix}.{q}.bias", (h * k,), (*path, "query_bias"), (h, k), layers),
      key_bias,
      _reshaped(f"{prefix}.{v}.bias", (g * k,), (*path, "value_bias"), (g, k), layers),
    ]
  if out_bias:
    out.append(_reshaped(f"{prefix}.{o}.bias", (d,), (*path, "out_bias"), (d,), layers))
  return out


def _fused_qkv(prefix, path, dims, layers) -> list[Tensor]:
  """GPT-2's c_attn: one Conv1D [d, 3d] (and bias [3d]) holding query, key and value."""
  d, h, k = dims.d_model, dims.num_heads, dims.head_dim
  parts = ("query", "key", "value")
  kernels = tuple((*path, p) for p in parts)

  def split_kernel(x):
    return {p: x[:, j * d : (j + 1) * d].reshape(d, h, k) for j, p in enumerate(kernels)}

  def join_kernel(p):
    return np.concatenate([p[path].reshape(d, d) for path in kernels], axis=1)

  biases = ((*path, "query_bias"), (*path, "value_bias"))

  def split_bias(x):
    return {biases[0]: x[:d].reshape(h, k), biases[1]: x[2 * d :].reshape(h, k)}

  def join_bias(p):  # the key's third is zeros (see _dropped)
    q, v = (p[b].reshape(d) for b in biases)
    return np.concatenate([q, np.zeros_like(q), v])

  return [
    Tensor(f"{prefix}.c_attn.weight", (d, 3 * d), kernels, split_kernel, join_kernel, layers),
    Tensor(f"{prefix}.c_attn.bias", (3 * d,), biases, split_bias, join_bias, layers),
    _reshaped(f"{prefix}.c_proj.weight", (d, d), (*path, "out"), (h, k, d), layers),
    _reshaped(f"{prefix}.c_proj.bias", (d,), (*path, "out_bias"), (d,), layers),
  ]


# -- config.json -> the model section ---------------------------------------------------------

ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
ACTIVATIONS.update(relu="relu", silu="silu", swish="silu")


class ConfigJsonError(lmc.ConfigError):
  """A config.json field zerolm cannot honour."""


def _fail(source: str, field: str, message: str):
  raise ConfigJsonError(f"{source}/config.json: {field} {message}")


def _activation(hf: dict, field: str, source: str) -> str:
  name = hf[field]
  if name not in ACTIVATIONS:
    _fail(source, field, f"{name!r} is not implemented; zerolm has {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# transformers' config classes' defaults for the fields read here: a config.json without one
# means that default (checked against transformers in tests/test_hf_models.py).
_LLAMA = dict(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=None,
  head_dim=None,
  hidden_act="silu",
  max_position_embeddings=2048,
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  attention_bias=False,
  mlp_bias=False,
  bos_token_id=1,
  eos_token_id=2,
)
DEFAULTS = {
  "gpt2": dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False,
    tie_word_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
  ),
  "llama": _LLAMA,
  "mistral": dict(
    _LLAMA,
    intermediate_size=14336,
    num_key_value_heads=8,
    max_position_embeddings=4096 * 32,
    sliding_window=4096,
  ),
  "qwen2": dict(
    _LLAMA,
    vocab_size=151936,
    intermediate_size=22016,
    num_key_value_heads=32,
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
    bos_token_id=None,
    eos_token_id=None,
  ),
  "marian": dict(
    vocab_size=58101,
    max_position_embeddings=1024,
    encoder_layers=12,
    encoder_ffn_dim=4096,
    encoder_attention_heads=16,
    decoder_layers=12,
    decoder_ffn_dim=4096,
    decoder_attention_heads=16,
    activation_function="gelu",
    d_model=1024,
    scale_embedding=False,
    pad_token_id=58100,
    eos_token_id=0,
    decoder_start_token_id=58100,
    share_encoder_decoder_embeddings=True,
    tie_word_embeddings=True,
  ),
}


def model_config(hf: dict, source: str) -> ml_collections.ConfigDict:
  """A zerolm config (task and model section) for a checkpoint's config.json; `source` names
  the directory in errors."""
  kind = hf.get("model_type")
  builders = {"gpt2": _gpt2_config, "llama": _llama_config, "marian": _marian_config}
  builders.update(mistral=_llama_config, qwen2=_llama_config)
  if kind not in builders:
    _fail(source, "model_type", f"{kind!r} is not supported; zerolm imports {', '.join(builders)}")
  # Only absent fields take the default: an explicit null is transformers' None too (Mistral
  # v0.2's "sliding_window": null is full attention).
  hf = {**DEFAULTS[kind], **hf}
  cfg = lmc.translation_defaults() if kind == "marian" else lmc.lm_defaults()
  cfg.model.update(dropout_rate=0.0, label_smoothing=0.0, lora_rank=0, adapter_dim=0)
  cfg.model.update(builders[kind](hf, source))
  return cfg


def _gpt2_config(hf, source) -> dict:
  for field, wanted in (
    ("scale_attn_by_inverse_layer_idx", False),
    ("reorder_and_upcast_attn", False),
    ("scale_attn_weights", True),
  ):
    if hf.get(field, wanted) != wanted:
      _fail(source, field, f"{hf[field]!r} is not implemented (only {wanted!r})")
  d = hf["n_embd"]
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=d,
    num_heads=hf["n_head"],
    num_kv_heads=0,
    head_dim=0,
    mlp_dim=hf.get("n_inner") or 4 * d,
    dec_layers=hf["n_layer"],
    activation=_activation(hf, "activation_function", source),
    positions="learned",
    max_len=hf["n_positions"],
    norm="layernorm",
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    norm_position="pre",
    embed_scale="none",
    use_bias=True,
    qkv_bias=False,
    logits_bias=False,
    tie_embeddings=hf.get("tie_word_embeddings", True),
    start_id=_start_id(hf, source),
  )


def _rope_theta(hf, source) -> float:
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    field = "rope_parameters.rope_type" if rope else "rope_scaling"
    _fail(source, field, f"{kind!r} is not implemented (only plain rotary, 'default')")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf, source) -> dict:
  kind = hf["model_type"]
  if hf.get("hidden_act", "silu") != "silu":
    _fail(source, "hidden_act", f"{hf['hidden_act']!r} is not implemented (only 'silu')")
  window = hf.get("sliding_window")
  if window and window < hf["max_position_embeddings"] and _slides(hf):
    _fail(source, "sliding_window", f"{window} is not implemented (full attention only)")
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field, False):
      _fail(source, field, "true is not implemented (Qwen2's query/key/value biases are)")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or d // h
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=d,
    num_heads=h,
    num_kv_heads=hf.get("num_key_value_heads") or h,
    head_dim=head_dim,
    mlp_dim=hf["intermediate_size"],
    dec_layers=hf["num_hidden_layers"],
    activation="swiglu",
    positions="rotary",
    rope_theta=_rope_theta(hf, source),
    max_len=hf.get("max_position_embeddings", 2048),
    norm="rmsnorm",
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    norm_position="pre",
    embed_scale="none",
    use_bias=False,
    qkv_bias=kind == "qwen2",
    logits_bias=False,
    tie_embeddings=hf.get("tie_word_embeddings", False),
    start_id=_start_id(hf, source),
  )


def _slides(hf) -> bool:
  """Whether some layer attends within a sliding window, as transformers decides it: Mistral's
  every layer when sliding_window is set; Qwen2's layers from max_window_layers on when
  use_sliding_window is (or an explicit layer_types)."""
  if hf["model_type"] != "qwen2":
    return hf["model_type"] == "mistral"  # Mistral ignores layer_types
  if hf.get("layer_types"):
    return "sliding_attention" in hf["layer_types"]
  return bool(hf["use_sliding_window"]) and hf["max_window_layers"] < hf["num_hidden_layers"]


def _marian_config(hf, source) -> dict:
  # MarianModel reads neither normalize_before, normalize_embedding, add_bias_logits nor
  # static_position_embeddings (BART's options in its config): they change nothing here either.
  for field in ("attention_heads", "ffn_dim"):
    if hf[f"encoder_{field}"] != hf[f"decoder_{field}"]:
      _fail(source, f"decoder_{field}", f"differs from encoder_{field}; zerolm needs them equal")
  for field in ("share_encoder_decoder_embeddings", "tie_word_embeddings"):
    if not hf[field]:
      _fail(source, field, "false is not implemented (one embedding for encoder, decoder, output)")
  if hf.get("decoder_vocab_size") not in (None, hf["vocab_size"]):
    _fail(source, "decoder_vocab_size", "differs from vocab_size; zerolm needs one vocabulary")
  return dict(
    vocab_size=hf["vocab_size"],
    d_model=hf["d_model"],
    num_heads=hf["encoder_attention_heads"],
    num_kv_heads=0,
    head_dim=0,
    mlp_dim=hf["encoder_ffn_dim"],
    enc_layers=hf["encoder_layers"],
    dec_layers=hf["decoder_layers"],
    activation=_activation(hf, "activation_function", source),
    positions="sinusoidal",
    sinusoid="marian",
    max_len=hf["max_position_embeddings"],
    norm="layernorm",
    norm_eps=1e-5,  # torch's LayerNorm default, which Marian uses
    norm_position="post",
    embed_scale="sqrt_d" if hf["scale_embedding"] else "none",
    use_bias=True,
    qkv_bias=False,
    logits_bias=True,
    tie_embeddings=True,
    start_id=_marian_start(hf, source),
  )


def _marian_start(hf, source) -> int:
  for field in ("decoder_start_token_id", "pad_token_id"):
    if hf.get(field) is not None:
      return hf[field]
  _fail(source, "decoder_start_token_id", "and pad_token_id are both null; set the start token")


def _first(ids):
  return ids[0] if isinstance(ids, list) else ids


def _start_id(hf, source) -> int:
  """What a decoder-only model reads before the first token: its BOS, or without one (Qwen2)
  its end-of-text token, which separates documents as GPT-2's 50256 does."""
  for field in ("bos_token_id", "eos_token_id"):
    if hf.get(field) is not None:
      return _first(hf[field])
  _fail(source, "bos_token_id", "and eos_token_id are both unset; set the model's start token")


# -- the model section -> config.json (export) --------------------------------------------------


def architecture_of(cfg) -> str:
  """The Hugging Face architecture a zerolm model is, or a one-line error listing the options
  that have none."""
  m = cfg.model
  for field, value in (("adapter_dim", m.adapter_dim), ("quantize", m.quantize)):
    if value:
      raise lmc.ConfigError(
        f"--format=hf: model.{field}={value!r} has no Hugging Face equivalent (adapters and "
        "int8 kernels are zerolm's); export --format=zerolm"
      )
  if cfg.task == "translation":
    wanted = dict(
      positions="sinusoidal",
      sinusoid="marian",
      norm="layernorm",
      norm_position="post",
      use_bias=True,
      qkv_bias=False,
      logits_bias=True,
      tie_embeddings=True,
      num_kv_heads=(0, m.num_heads),
      activation=tuple(set(ACTIVATIONS.values()) - {"swiglu"}),
      embed_scale=("sqrt_d", "none", "auto"),  # auto: sqrt_d with sinusoids
      head_dim=(0, m.d_model // m.num_heads),
      norm_eps=1e-5,
    )
    return _matching("marian", cfg, wanted)
  gpt2 = dict(
    positions="learned",
    norm="layernorm",
    norm_position="pre",
    use_bias=True,
    qkv_bias=False,
    logits_bias=False,
    num_kv_heads=(0, m.num_heads),
    activation=tuple(set(ACTIVATIONS.values()) - {"swiglu"}),
    embed_scale=("none", "auto"),
    head_dim=(0, m.d_model // m.num_heads),
  )
  llama = dict(
    positions="rotary",
    norm="rmsnorm",
    norm_position="pre",
    activation="swiglu",
    use_bias=False,
    logits_bias=False,
    embed_scale=("none", "auto"),
  )
  if m.positions == "learned":
    return _matching("gpt2", cfg, gpt2)
  name = "qwen2" if m.qkv_bias else "llama"
  return _matching(name, cfg, llama)


def _matching(name: str, cfg, wanted: dict) -> str:
  off = []
  for field, values in wanted.items():
    values = values if isinstance(values, tuple) else (values,)
    if cfg.model[field] not in values:
      off.append(f"model.{field}={cfg.model[field]!r} (needs {' or '.join(map(repr, values))})")
  if off:
    raise lmc.ConfigError(f"--format=hf: no Hugging Face {name} equivalent for {', '.join(off)}")
  return name


def config_json(cfg, tokenizer) -> dict:
  """config.json for a zerolm model (architecture_of decides which)."""
  m, name = cfg.model, architecture_of(cfg)
  specials = dict(
    bos_token_id=tokenizer.bos_id,
    # Several ends (a list) as the model had them, so that a re-import stops at each.
    eos_token_id=list(tokenizer.eos_ids) if len(tokenizer.eos_ids) > 1 else tokenizer.eos_id,
    pad_token_id=tokenizer.pad_id,
  )
  inverse = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}
  if name == "gpt2":
    return dict(
      architectures=["GPT2LMHeadModel"],
      model_type="gpt2",
      vocab_size=m.vocab_size,
      n_embd=m.d_model,
      n_head=m.num_heads,
      n_layer=m.dec_layers,
      n_inner=m.mlp_dim,
      n_positions=m.max_len,
      activation_function=inverse[m.activation],
      layer_norm_epsilon=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings,
      **{**specials, "bos_token_id": m.start_id},
    )
  if name in ("llama", "qwen2"):
    return dict(
      architectures=["Qwen2ForCausalLM" if name == "qwen2" else "LlamaForCausalLM"],
      model_type=name,
      vocab_size=m.vocab_size,
      hidden_size=m.d_model,
      num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads,
      head_dim=m.head_dim or m.d_model // m.num_heads,
      intermediate_size=m.mlp_dim,
      num_hidden_layers=m.dec_layers,
      hidden_act="silu",
      max_position_embeddings=m.max_len,
      rms_norm_eps=m.norm_eps,
      rope_theta=m.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
      attention_bias=False,
      mlp_bias=False,
      tie_word_embeddings=m.tie_embeddings,
      **{**specials, "bos_token_id": m.start_id},
    )
  return dict(
    architectures=["MarianMTModel"],
    model_type="marian",
    vocab_size=m.vocab_size,
    decoder_vocab_size=m.vocab_size,
    d_model=m.d_model,
    encoder_layers=m.enc_layers,
    decoder_layers=m.dec_layers,
    encoder_attention_heads=m.num_heads,
    decoder_attention_heads=m.num_heads,
    encoder_ffn_dim=m.mlp_dim,
    decoder_ffn_dim=m.mlp_dim,
    activation_function=inverse[m.activation],
    max_position_embeddings=m.max_len,
    # "auto" scales with sinusoids, which a Marian model has.
    scale_embedding=m.embed_scale in ("sqrt_d", "auto"),
    share_encoder_decoder_embeddings=True,
    tie_word_embeddings=True,
    decoder_start_token_id=m.start_id,
    is_encoder_decoder=True,
    **specials,
  )


# -- tensors --------------------------------------------------------------------------------


def tensors(kind: str, dims, hf_vocab: int) -> list[Tensor]:
  """Every tensor of a `kind` checkpoint (model_type) for a model of `dims` (lm.models'
  ModelDims: its vocab_size is our padded one) whose embedding has `hf_vocab` rows."""
  if kind == "gpt2":
    return _gpt2_tensors(dims, hf_vocab)
  if kind == "marian":
    return _marian_tensors(dims, hf_vocab)
  return _llama_tensors(dims, hf_vocab)


def _head(dims, hf_vocab, name="lm_head.weight") -> list[Tensor]:
  if dims.tie_embeddings:
    return []  # tied: absent from the state dict
  return [_vocab_rows(name, hf_vocab, dims.vocab_size, dims.d_model, ("output",), transpose=True)]


def _gpt2_tensors(dims, vocab) -> list[Tensor]:
  d, f, L = dims.d_model, dims.mlp_dim, dims.dec_layers
  layer = ("decoder", "layers")
  out = [
    _vocab_rows("transformer.wte.weight", vocab, dims.vocab_size, d, ("embed", "table")),
    _reshaped("transformer.wpe.weight", (dims.max_len, d), ("pos_table",), (dims.max_len, d)),
  ]
  p = "transformer.h.{i}"
  out += _norm(f"{p}.ln_1", (*layer, "self_attn_norm"), d, L)
  out += _fused_qkv(f"{p}.attn", (*layer, "self_attn"), dims, L)
  out += _norm(f"{p}.ln_2", (*layer, "mlp_norm"), d, L)
  mlp = (*layer, "mlp")
  out += [
    _reshaped(f"{p}.mlp.c_fc.weight", (d, f), (*mlp, "wi"), (d, f), L),
    _reshaped(f"{p}.mlp.c_fc.bias", (f,), (*mlp, "wi_bias"), (f,), L),
    _reshaped(f"{p}.mlp.c_proj.weight", (f, d), (*mlp, "wo"), (f, d), L),
    _reshaped(f"{p}.mlp.c_proj.bias", (d,), (*mlp, "wo_bias"), (d,), L),
  ]
  return out + _norm("transformer.ln_f", ("decoder_norm",), d) + _head(dims, vocab)


def _llama_tensors(dims, vocab) -> list[Tensor]:
  d, f, L = dims.d_model, dims.mlp_dim, dims.dec_layers
  layer = ("decoder", "layers")
  p = "model.layers.{i}"
  out = [_vocab_rows("model.embed_tokens.weight", vocab, dims.vocab_size, d, ("embed", "table"))]
  out += _norm(f"{p}.input_layernorm", (*layer, "self_attn_norm"), d, L, bias=False)
  out += _attention(
    f"{p}.self_attn",
    (*layer, "self_attn"),
    dims,
    L,
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    bias=dims.qkv_bias,
    out_bias=False,
  )
  out += _norm(f"{p}.post_attention_layernorm", (*layer, "mlp_norm"), d, L, bias=False)
  mlp = (*layer, "mlp")
  out += [
    _transposed(f"{p}.mlp.gate_proj.weight", (f,), (d,), (*mlp, "wi_gate"), L),
    _transposed(f"{p}.mlp.up_proj.weight", (f,), (d,), (*mlp, "wi"), L),
    _transposed(f"{p}.mlp.down_proj.weight", (d,), (f,), (*mlp, "wo"), L),
  ]
  return out + _norm("model.norm", ("decoder_norm",), d, bias=False) + _head(dims, vocab)


def _marian_tensors(dims, vocab) -> list[Tensor]:
  d, f = dims.d_model, dims.mlp_dim
  out = [
    _vocab_rows("model.shared.weight", vocab, dims.vocab_size, d, ("embed", "table")),
    _vocab_bias("final_logits_bias", vocab, dims.vocab_size, ("logits_bias",)),
  ]
  names = ("q_proj", "k_proj", "v_proj", "out_proj")
  sides = (("encoder", dims.enc_layers, ("self_attn", "attn")),)
  sides += (
    ("decoder", dims.dec_layers, ("self_attn", "self_attn"), ("encoder_attn", "cross_attn")),
  )
  for side, L, *blocks in sides:
    p, layer = f"model.{side}.layers.{{i}}", (side, "layers")
    for theirs, ours in blocks:
      out += _attention(f"{p}.{theirs}", (*layer, ours), dims, L, names, True, True)
      out += _norm(f"{p}.{theirs}_layer_norm", (*layer, f"{ours}_norm"), d, L)
    mlp = (*layer, "mlp")
    out += [
      _transposed(f"{p}.fc1.weight", (f,), (d,), (*mlp, "wi"), L),
      _reshaped(f"{p}.fc1.bias", (f,), (*mlp, "wi_bias"), (f,), L),
      _transposed(f"{p}.fc2.weight", (d,), (f,), (*mlp, "wo"), L),
      _reshaped(f"{p}.fc2.bias", (d,), (*mlp, "wo_bias"), (d,), L),
    ]
    out += _norm(f"{p}.final_layer_norm", (*layer, "mlp_norm"), d, L)
  return out + _head(dims, vocab)
