"""Config schema: every key has its one default here, and `validate` checks every value.

Experiment modules start from `translation_defaults()` or `lm_defaults()` and change fields;
the command line may override them (`--config.model.d_model=128`). The ConfigDicts are
locked, so a misspelt key raises instead of being silently added.
"""

from __future__ import annotations

import re

import ml_collections

TASKS = ("translation", "lm", "classify")
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu", "swiglu")
POSITIONS = ("sinusoidal", "learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
REMAT = ("auto", "none", "full", "save_dots")
DTYPES = ("auto", "float32", "bfloat16")
ATTENTION = ("auto", "xla", "cudnn", "splash")  # lm/models/attention.py
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "adafactor")
SCHEDULES = ("constant", "rsqrt", "cosine", "linear")
# task=classify: the stack under the pooled head, and the poolings each body allows.
CLASSIFIER_POOLING = {"encoder": ("mean", "first"), "decoder": ("last",)}

# Published Transformer sizes ("Attention is all you need", table 3) and GPT-2.
TRANSFORMER_SIZES = {
  "tiny": dict(d_model=64, num_heads=4, mlp_dim=256, enc_layers=2, dec_layers=2),
  "base": dict(d_model=512, num_heads=8, mlp_dim=2048, enc_layers=6, dec_layers=6),
  "big": dict(d_model=1024, num_heads=16, mlp_dim=4096, enc_layers=6, dec_layers=6),
}
GPT2_SIZES = {
  "small": dict(d_model=768, num_heads=12, mlp_dim=3072, dec_layers=12),
  "medium": dict(d_model=1024, num_heads=16, mlp_dim=4096, dec_layers=24),
}


class ConfigError(ValueError):
  """A bad config value; the message names the field and the fix."""


def _base() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.task = "translation"
  cfg.seed = 0
  cfg.zero_stage = 0  # 0 DP, 1 +opt state sharded, 2 +grads, 3 +params (FSDP) over mesh.fsdp

  cfg.model = ml_collections.ConfigDict(
    dict(
      vocab_size=8000,
      d_model=512,
      num_heads=8,
      # Grouped-query attention: key/value heads, each shared by num_heads / num_kv_heads query
      # heads; 0 = num_heads (multi-head attention).
      num_kv_heads=0,
      head_dim=0,  # 0 = d_model // num_heads
      # The attention kernel: auto = cuDNN flash on GPU, splash on TPU, XLA on CPU (and where
      # the platform's kernel cannot take the model); xla, cudnn or splash to insist.
      attention="auto",
      # Query positions per step of XLA attention (scores [b, h, chunk, length] at a time, in
      # the backward too); 0 = all at once. 512: lengths up to 512 run whole, as before.
      attention_chunk=512,
      mlp_dim=2048,
      enc_layers=6,  # ignored by the decoder-only LM
      dec_layers=6,
      # relu; gelu (tanh approximation, GPT-2's gelu_new); gelu_exact (erf); silu; swiglu
      # (a silu-gated MLP with a second input kernel, Llama's).
      activation="relu",
      positions="sinusoidal",
      # Sinusoid frequencies: "t2t" (tensor2tensor's: 1 / 10000^(i / (d/2 - 1))) or "marian"
      # (1 / 10000^(2i / d), Marian's and Vaswani et al.'s); either way sines, then cosines.
      sinusoid="t2t",
      rope_theta=10000.0,  # rotary's base wavelength
      max_len=512,  # table size for learned positions; longest sequence for rotary/sinusoidal
      norm="layernorm",
      norm_eps=1e-6,
      # "pre": x + f(norm(x)), with a final norm after the last layer; "post": norm(x + f(x))
      # (Vaswani et al., Marian), no final norm.
      norm_position="pre",
      # Token embeddings times sqrt(d_model): "auto" with sinusoidal positions, or "sqrt_d" /
      # "none" always.
      embed_scale="auto",
      use_bias=True,  # biases on every projection (attention and MLP) but the key (see layers)
      qkv_bias=False,  # biases on the query, key and value projections only (Qwen2's)
      logits_bias=False,  # a learned bias on the output logits (Marian's final_logits_bias)
      tie_embeddings=True,  # one table for encoder input, decoder input and output logits
      # The token the decoder reads at position 0 of every segment: the tokenizer's BOS for
      # zerolm's own (2); an imported model's decoder start (Marian: its pad; GPT-2: 50256).
      start_id=2,
      dropout_rate=0.1,
      label_smoothing=0.1,
      # Positions per chunk of the loss: each chunk's logits [rows, chunk, vocab] are computed,
      # used for the loss and its gradient, and dropped; 0 = all at once (short sequences' programs
      # as they were; chunks cost no step time, measured, and pay when the logits are large).
      loss_chunk=0,
      dtype="auto",  # compute dtype; auto = bfloat16 on TPU/GPU, float32 on CPU
      param_dtype="float32",
      # Recompute in the backward pass: none (keep activations), full (keep only layer inputs),
      # save_dots (keep matmul outputs); auto = save_dots under ZeRO-3 (the backward re-gathers
      # each layer instead of keeping every gathered layer), else none.
      remat="auto",
      # LoRA (Hu et al. 2021): a rank-r update beside each projection whose <block>/<name>
      # matches lora_targets (blocks attn, self_attn, cross_attn with query, key, value, out;
      # mlp with wi, wi_gate, wo), scaled by lora_alpha / lora_rank; 0 = none.
      lora_rank=0,
      lora_alpha=16.0,
      lora_targets="query|value",
      # Houlsby adapters: a residual bottleneck of this width after every attention and MLP
      # block; 0 = none.
      adapter_dim=0,
      # "int8": matmul kernels stored as int8 with per-output-channel float scales, dequantized
      # per layer as it runs. Set by --mode=export --export_dtype=int8; inference only.
      quantize="",
      # Circular pipeline (mesh.stage > 1): each stage holds this many non-adjacent groups of
      # dec_layers / (stage * repeats) layers, and microbatches loop over the stages this many
      # times: a smaller bubble for more stage-to-stage traffic. Checkpoints keep layer order.
      pipeline_repeats=1,
      # task=classify: a head of num_classes logits (0 = one per data.labels name, or per label
      # the training data holds) over the pooled output of an "encoder" stack (enc_layers;
      # pooling "mean" over the example's tokens or its "first") or a causal "decoder" stack
      # (dec_layers; pooling "last": the last token, the only one that has seen the whole text).
      num_classes=0,
      classifier_body="encoder",
      pooling="mean",
    )
  )
  # stage: pipeline stages (consecutive groups of layers) within a slice; dcn_stage: across
  # slices (or processes). The job has stage * dcn_stage stages, data * dcn_data replicas.
  cfg.mesh = ml_collections.ConfigDict(
    dict(stage=1, data=1, fsdp=-1, tensor=1, dcn_stage=1, dcn_data=1)
  )
  cfg.train = ml_collections.ConfigDict(
    dict(
      total_steps=1000,
      global_batch_size=64,  # rows per step over all devices and microbatches
      microbatches=1,
      # Pipeline parallelism (mesh.stage > 1): each microbatch's rows of a (data, fsdp) group
      # split into this many pipeline microbatches M, a multiple of the stage count (0 = one
      # per stage). The bubble is (stages - 1) / (M * model.pipeline_repeats + stages - 1).
      pipeline_microbatches=0,
      # ZeRO-3 with pipelining: gather a stage's layers over fsdp once per pass ("step": more
      # memory, the gathered layers live through the pass) or in every pipeline iteration
      # ("iteration": one layer at a time, M*R + stages - 1 times over).
      pipeline_gather="step",
      # Gradient sums over the batch axes travel in this dtype (accumulated in float32 after
      # each reduction); bfloat16 halves gradient traffic.
      grad_reduce_dtype="float32",
      # Local SGD / DiLoCo: replicas along mesh.data take sync_every steps on their own
      # batches, then average their parameter deltas (token-weighted) and apply the average
      # with the outer optimizer: "average" (SGD, lr 1) or "nesterov" (DiLoCo: outer_lr 0.7,
      # outer_momentum 0.9). sync_every=0: every step is synchronous (no outer loop).
      sync_every=0,
      outer_optimizer="average",
      outer_lr=0.7,
      outer_momentum=0.9,
      log_every=50,
      on_nan="skip",  # non-finite loss or grad norm: "skip" the update (counted) or "halt"
      # Start from a trained model: a workdir (its latest checkpoint) or an export. Its model
      # shape and tokenizer are used; training starts at step 0 with a fresh optimizer.
      init_from="",
      # A regex over parameter paths (e.g. decoder/layers/mlp/wi) that train; the rest stay
      # frozen: no gradient, no optimizer state. "" = every parameter, or with LoRA / adapters
      # on, only theirs.
      trainable="",
      # Distillation: a trained model (workdir or export) with the same tokenizer, run frozen
      # in the same step; the loss is (1 - w) * cross-entropy + w * T^2 * KL(teacher's
      # softmax(logits / T) || the student's), w = distill_weight, T = distill_temperature.
      teacher="",
      distill_weight=0.5,
      distill_temperature=2.0,
    )
  )
  cfg.decode = ml_collections.ConfigDict(
    dict(
      beam_size=4,  # translation; 1 = greedy
      alpha=0.6,  # length penalty ((5 + len) / 6) ** alpha
      max_len=256,  # hard cap on generated tokens
      max_len_a=1.5,  # translation stops at max_len_a * source tokens + max_len_b
      max_len_b=10,
      temperature=0.0,  # LM continuation: 0 = greedy, > 0 samples with top_k / top_p
      top_k=0,
      top_p=1.0,
      seed=0,
      batch_size=64,
      length_buckets=(),  # source widths batches are padded to; () = powers of two to seq_len
    )
  )
  cfg.serve = ml_collections.ConfigDict(
    dict(
      # continuous: requests join and leave a fixed set of decode slots between steps, and
      # tokens stream as they are made (lm/engine.py); static: batches run to completion.
      # Beam search always runs in static batches.
      batching="continuous",
      slots=64,  # rows of the continuous decode state (rounded up to the mesh's batch divisor)
      steps_per_chunk=4,  # decode steps per program call: tokens reach the host this often
      prefill_rows=8,  # most prompts (sources) one prefill holds; fewer pad to a power of two
      model_name="zerolm",  # the model id of the OpenAI-compatible API (/v1/models)
      max_batch=32,  # rows one static decode batch holds (requests that arrive together)
      # A batch waits at most this long after its first row for more rows. 0: rows that arrive
      # while a batch runs form the next one, and a lone row never waits (measured on the demo,
      # beam 4: 10 ms cost 5x the throughput at concurrency 1 and gained nothing at 64).
      max_wait_ms=0,
      length_buckets=(),  # source widths compiled at start-up; () = decode.length_buckets
      max_input_tokens=0,  # longest accepted input; 0 = what the model takes (data.seq_len)
      max_items=64,  # texts in one request
      timeout_s=30.0,  # a request not answered by then gets 504
      max_queue=1024,  # rows waiting; past this a request gets 503 with Retry-After
      max_body_bytes=1 << 20,  # a larger request body gets 413, refused before it is read whole
    )
  )
  cfg.eval = ml_collections.ConfigDict(
    dict(
      every=0,  # steps between evaluations during training; 0 = only at the end
      bleu=True,  # translation evals decode the held-out set and report sacreBLEU
      examples=4,  # translations / continuations shown at each evaluation
    )
  )
  cfg.checkpoint = ml_collections.ConfigDict(
    dict(
      every=1000,  # steps between async saves; 0 = only at the end and on SIGTERM
      keep=3,  # most recent checkpoints kept
      best_metric="",  # also keep the best by this eval metric, e.g. "eval_loss" or "bleu"
      on_corrupt="fallback",  # a step that does not read whole: use the one before, or "fail"
    )
  )
  cfg.optim = ml_collections.ConfigDict(
    dict(
      name="adamw",
      learning_rate=1e-3,
      schedule="rsqrt",
      warmup_steps=1000,
      end_fraction=0.0,  # final lr / peak lr for cosine and linear decay
      b1=0.9,
      b2=0.98,
      eps=1e-9,
      momentum=0.9,
      weight_decay=0.0,
      clip_norm=1.0,  # 0 = no clipping
    )
  )
  cfg.data = ml_collections.ConfigDict(
    dict(
      source="synthetic:demo",  # tfds:NAME[/CONFIG][:SPLIT], tsv:GLOB, text:, jsonl:, synthetic:
      eval_source="",  # "" = hold out the first eval_examples examples of `source`
      direction="",  # translation direction for tfds/jsonl records, e.g. "en->de"
      # jsonl keys: "src_key,tgt_key" (translation), "text_key" (LM), "label_key,text_key"
      fields="",
      # task=classify: the label names, comma-separated, in class order; "" = the sorted labels
      # found in data.source (saved with the checkpoint, so every mode uses the same order).
      labels="",
      tfds_data_dir="",  # "" = TFDS_DATA_DIR or ~/tensorflow_datasets
      seq_len=64,
      pack=True,  # several examples per row, with segment ids and positions
      too_long="truncate",  # or "drop"; LM also "split" (into seq_len pieces): past seq_len
      eval_examples=512,  # at most this many held-out examples
      tokenizer="",  # an existing SentencePiece model; "" = train one into WORKDIR
      spm_model_type="unigram",  # unigram, bpe, word, char
      tokenizer_sample=200_000,  # training examples sampled to train the tokenizer
      prefetch=4,  # batches prepared ahead by a background thread; 0 = none
      workers=0,  # > 0: grain worker processes build batches (for hosts with many cores)
      mix_temperature=1.0,  # several pairs: pair i drawn with p ∝ n_i^(1/T); 1 = proportional
    )
  )
  return cfg


def translation_defaults() -> ml_collections.ConfigDict:
  cfg = _base()
  cfg.lock()
  return cfg


def lm_defaults() -> ml_collections.ConfigDict:
  cfg = _base()
  cfg.task = "lm"
  cfg.model.update(activation="gelu", positions="learned", dropout_rate=0.0, label_smoothing=0.0)
  cfg.optim.update(schedule="cosine", warmup_steps=2000, b2=0.95, eps=1e-8, weight_decay=0.1)
  cfg.lock()
  return cfg


def classify_defaults() -> ml_collections.ConfigDict:
  """Text classification: an encoder with a mean-pooled head; one example per row."""
  cfg = _base()
  cfg.task = "classify"
  cfg.data.pack = False
  cfg.lock()
  return cfg


# The model fields that decide parameter shapes or what the parameters compute: a run started
# from a trained model (train.init_from) takes them from it.
SHAPE_FIELDS = (
  "vocab_size",
  "d_model",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "mlp_dim",
  "enc_layers",
  "dec_layers",
  "activation",
  "positions",
  "max_len",
  "norm",
  "norm_position",
  "norm_eps",
  "embed_scale",
  "sinusoid",
  "rope_theta",
  "start_id",
  "use_bias",
  "qkv_bias",
  "logits_bias",
  "tie_embeddings",
  "param_dtype",
)


def adopt_model(cfg, source, overridden=()) -> ml_collections.ConfigDict:
  """A copy of `cfg` with the source config's task and shape fields; a field in `overridden`
  (set on the command line) that differs from the source's is an error."""
  body = CLASSIFIER_BODIES.get(source.task) if cfg.task == "classify" else None
  if cfg.task != source.task and body is None:
    _fail("task", f"{cfg.task!r}, but train.init_from is a {source.task!r} model")
  if cfg.data.tokenizer:
    _fail("data.tokenizer", "train.init_from brings its own tokenizer; leave this empty")
  cfg = cfg.copy_and_resolve_references()
  for field in SHAPE_FIELDS:
    if f"model.{field}" in overridden and cfg.model[field] != source.model[field]:
      _fail(
        f"model.{field}",
        f"{cfg.model[field]!r} changes the model train.init_from holds "
        f"({source.model[field]!r}); drop the override",
      )
    cfg.model[field] = source.model[field]
  if cfg.task == "classify":
    _adopt_classifier_body(cfg, source, body, overridden)
  return cfg


# task=classify from init_from: a translation model's encoder or a language model's decoder.
CLASSIFIER_BODIES = {"translation": "encoder", "lm": "decoder"}


def _adopt_classifier_body(cfg, source, body: str | None, overridden) -> None:
  """The classifier's body is the source's stack (a classifier's own: its body, pooling and
  classes); pooling follows a decoder body ("last") unless set on the command line."""
  if body is None:  # a classifier: continue with its head
    fields = ("classifier_body", "pooling", "num_classes")
    cfg.model.update({f: source.model[f] for f in fields})
    cfg.data.labels = cfg.data.labels or source.data.labels
    return
  if "model.classifier_body" in overridden and cfg.model.classifier_body != body:
    _fail(
      "model.classifier_body",
      f"{cfg.model.classifier_body!r}, but train.init_from is a {source.task!r} model, whose "
      f"stack is a {body!r}; drop the override",
    )
  cfg.model.classifier_body = body
  if "model.pooling" not in overridden:
    cfg.model.pooling = CLASSIFIER_POOLING[body][0]


# What eval, decode and serve take from --config: the model and its training data come from the
# checkpoint; these sections whole, and these fields where the command line sets them.
INFERENCE_SECTIONS = ("mesh", "zero_stage", "decode", "eval", "serve")
INFERENCE_FIELDS = (
  "data.seq_len",  # the longest input: an hf: model has no training length of its own
  "data.eval_source",
  "data.eval_examples",
  "train.global_batch_size",
  "train.microbatches",
  "model.loss_chunk",  # how the loss is computed, not what: evaluation may chunk otherwise
  "model.attention",  # the kernel belongs to the platform that runs the model, not its checkpoint
  "model.attention_chunk",
)
# How the layers lie on the mesh's pipeline stages: the mesh's, taken with it.
PIPELINE_FIELDS = ("model.pipeline_repeats", "train.pipeline_microbatches", "train.pipeline_gather")


def inference_settings(cfg, overridden, mode: str) -> dict:
  """The flat {field: value} that --mode=eval/decode/serve applies over a checkpoint's config;
  an overridden field it cannot honour is an error naming it."""
  for field in sorted(overridden):
    allowed = INFERENCE_FIELDS + PIPELINE_FIELDS
    if not (field.split(".")[0] in INFERENCE_SECTIONS or field in allowed):
      raise ConfigError(
        f"--config.{field}: --mode={mode} takes the model and its training settings from the "
        f"checkpoint; it applies only {', '.join(s + '.*' for s in INFERENCE_SECTIONS[2:])}, "
        f"mesh.*, zero_stage, {', '.join(allowed)}"
      )
  validate(cfg, training=False)
  settings = {"zero_stage": cfg.zero_stage, **{f: _lookup(cfg, f) for f in PIPELINE_FIELDS}}
  for section in ("mesh", "decode", "eval", "serve"):
    settings.update({f"{section}.{k}": v for k, v in cfg[section].items()})
  settings.update({f: _lookup(cfg, f) for f in INFERENCE_FIELDS if f in overridden})
  return settings


def _fail(field: str, message: str):
  raise ConfigError(f"config.{field}: {message}")


def _check_choice(cfg, field: str, choices):
  value = _lookup(cfg, field)
  if value not in choices:
    _fail(field, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _check_positive(cfg, field: str, allow_zero: bool = False):
  value = _lookup(cfg, field)
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    _fail(field, f"{value!r} must be a number {bound}")


def _lookup(cfg, field: str):
  for part in field.split("."):
    cfg = cfg[part]
  return cfg


def _check_known_keys(cfg, schema, prefix: str = ""):
  for key in cfg.keys():
    if key not in schema:
      _fail(prefix + key, f"unknown field; known fields are {', '.join(sorted(schema.keys()))}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      _check_known_keys(cfg[key], schema[key], prefix + key + ".")


def validate(cfg: ml_collections.ConfigDict, training: bool = True) -> None:
  """Raises ConfigError on the first bad value. Device-dependent checks live in mesh.py.
  `training=False`: only what the model, its data, decoding and serving need (a checkpoint's
  saved config, read by eval, decode, export and serve, is not held to training's rules)."""
  _check_known_keys(cfg, _base())
  _check_choice(cfg, "task", TASKS)
  _check_choice(cfg, "zero_stage", (0, 1, 2, 3))
  m = cfg.model
  for field in ("vocab_size", "d_model", "num_heads", "mlp_dim", "dec_layers", "max_len"):
    _check_positive(cfg, "model." + field)
  for field in ("head_dim", "enc_layers", "num_kv_heads", "start_id", "loss_chunk"):
    _check_positive(cfg, "model." + field, allow_zero=True)
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    _fail(
      "model.num_kv_heads",
      f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}; each key/value head "
      "serves a whole group of query heads",
    )
  for field in ("rope_theta", "norm_eps"):
    _check_positive(cfg, "model." + field)
  if cfg.task == "translation" and m.enc_layers == 0:
    _fail("model.enc_layers", "a translation model needs at least one encoder layer")
  if m.head_dim == 0 and m.d_model % m.num_heads:
    _fail(
      "model.num_heads",
      f"{m.num_heads} does not divide model.d_model={m.d_model}; "
      "change one of them or set model.head_dim",
    )
  if m.positions == "rotary" and (m.head_dim or m.d_model // m.num_heads) % 2:
    _fail("model.head_dim", "rotary positions need an even head dimension")
  _check_choice(cfg, "serve.batching", ("continuous", "static"))
  fields = ("max_batch", "max_items", "max_queue", "timeout_s", "max_body_bytes", "slots")
  for field in (*fields, "steps_per_chunk", "prefill_rows"):
    _check_positive(cfg, "serve." + field)
  for field in ("max_wait_ms", "max_input_tokens"):
    _check_positive(cfg, "serve." + field, allow_zero=True)
  _check_choice(cfg, "model.activation", ACTIVATIONS)
  _check_choice(cfg, "model.positions", POSITIONS)
  _check_choice(cfg, "model.norm", NORMS)
  _check_choice(cfg, "model.norm_position", ("pre", "post"))
  _check_choice(cfg, "model.embed_scale", ("auto", "sqrt_d", "none"))
  _check_choice(cfg, "model.sinusoid", ("t2t", "marian"))
  _check_choice(cfg, "model.remat", REMAT)
  _check_choice(cfg, "model.attention", ATTENTION)
  _check_positive(cfg, "model.attention_chunk", allow_zero=True)
  if m.attention == "cudnn" and cfg.data.pack:
    _fail(
      "model.attention",
      "cudnn takes no packed rows (jax.nn.dot_product_attention has lengths, not segments); "
      "set data.pack=False or model.attention=auto",
    )
  if m.attention == "splash" and cfg.data.seq_len % 128:
    _fail(
      "model.attention",
      f"splash tiles lengths by 128 but data.seq_len={cfg.data.seq_len} is not a multiple of "
      "128; set data.seq_len to one or model.attention=auto",
    )
  _check_choice(cfg, "model.dtype", DTYPES)
  _check_choice(cfg, "model.param_dtype", ("float32", "bfloat16"))
  _check_choice(cfg, "model.quantize", ("", "int8"))
  for field in ("lora_rank", "adapter_dim"):
    _check_positive(cfg, "model." + field, allow_zero=True)
  _check_positive(cfg, "model.lora_alpha")
  for field in ("model.lora_targets", "train.trainable"):
    try:
      re.compile(_lookup(cfg, field))
    except re.error as e:
      _fail(field, f"{_lookup(cfg, field)!r} is not a regular expression ({e})")
  for field in ("dropout_rate", "label_smoothing"):
    value = m[field]
    if not 0.0 <= value < 1.0:
      _fail("model." + field, f"{value!r} must lie in [0, 1)")
  for field in ("stage", "dcn_stage"):
    if not isinstance(cfg.mesh[field], int) or cfg.mesh[field] < 1:
      _fail("mesh." + field, f"{cfg.mesh[field]!r} must be a positive integer")
  _check_positive(cfg, "model.pipeline_repeats")
  _check_positive(cfg, "train.pipeline_microbatches", allow_zero=True)
  _check_choice(cfg, "train.pipeline_gather", ("step", "iteration"))
  for axis in ("data", "fsdp", "tensor"):
    value = cfg.mesh[axis]
    if not isinstance(value, int) or (value < 1 and value != -1):
      _fail("mesh." + axis, f"{value!r} must be a positive integer or -1 (fill)")
  if [cfg.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    _fail("mesh", "at most one of data, fsdp, tensor may be -1")
  _check_positive(cfg, "mesh.dcn_data")
  for field in ("global_batch_size", "microbatches"):
    _check_positive(cfg, "train." + field)
  for field in ("every", "examples"):
    _check_positive(cfg, "eval." + field, allow_zero=True)
  _check_choice(cfg, "train.grad_reduce_dtype", ("float32", "bfloat16"))
  for field in ("beam_size", "max_len", "batch_size"):
    _check_positive(cfg, "decode." + field)
  for field in ("alpha", "max_len_a", "max_len_b", "temperature", "top_k"):
    _check_positive(cfg, "decode." + field, allow_zero=True)
  buckets = cfg.decode.length_buckets
  if not all(isinstance(b, int) and b > 0 for b in buckets) or list(buckets) != sorted(buckets):
    _fail("decode.length_buckets", f"{buckets!r} must be increasing positive integers")
  if not 0.0 < cfg.decode.top_p <= 1.0:
    _fail("decode.top_p", f"{cfg.decode.top_p!r} must lie in (0, 1]")
  if cfg.train.global_batch_size % cfg.train.microbatches:
    _fail(
      "train.global_batch_size",
      f"{cfg.train.global_batch_size} is not divisible by "
      f"train.microbatches={cfg.train.microbatches}",
    )
  for field in ("seq_len", "eval_examples", "tokenizer_sample"):
    _check_positive(cfg, "data." + field)
  _check_positive(cfg, "data.prefetch", allow_zero=True)
  _check_positive(cfg, "data.workers", allow_zero=True)
  _check_positive(cfg, "data.mix_temperature")
  _check_choice(cfg, "data.too_long", ("truncate", "drop", "split"))
  if cfg.data.too_long == "split" and cfg.task != "lm":
    _fail("data.too_long", "'split' cuts LM documents; for translation use truncate or drop")
  _check_choice(cfg, "data.spm_model_type", ("unigram", "bpe", "word", "char"))
  if m.positions == "learned" and cfg.data.seq_len > m.max_len:
    _fail("data.seq_len", f"{cfg.data.seq_len} exceeds model.max_len={m.max_len}")
  if not cfg.data.source:
    _fail("data.source", "empty; name a source such as 'synthetic:demo'")
  if cfg.task == "classify":
    _validate_classify(cfg)
  if training:
    _validate_training(cfg)


def _validate_classify(cfg: ml_collections.ConfigDict) -> None:
  m = cfg.model
  _check_choice(cfg, "model.classifier_body", tuple(CLASSIFIER_POOLING))
  _check_choice(cfg, "model.pooling", CLASSIFIER_POOLING[m.classifier_body])
  if m.classifier_body == "encoder" and m.enc_layers == 0:
    _fail("model.enc_layers", "an encoder classifier needs at least one encoder layer")
  _check_positive(cfg, "model.num_classes", allow_zero=True)
  names = label_names(cfg.data.labels)
  if len(set(names)) != len(names) or not all(names):
    _fail("data.labels", f"{cfg.data.labels!r} must name distinct, non-empty labels")
  if m.num_classes == 1 or (names and len(names) < 2):
    _fail("model.num_classes", "a classifier needs at least 2 classes")
  if names and m.num_classes and m.num_classes != len(names):
    _fail(
      "model.num_classes",
      f"{m.num_classes}, but data.labels names {len(names)}; set one to agree or 0 (from labels)",
    )
  if cfg.data.pack:
    _fail("data.pack", "a classification row holds one example (its pooled label); set False")
  if cfg.mesh.stage * cfg.mesh.dcn_stage > 1:
    _fail("mesh.stage", "classification does not run pipeline stages; set mesh.stage=1")


def task_metrics(task: str) -> tuple[str, ...]:
  """The eval metrics a task's evaluation reports (under these names; a classifier also has
  eval_precision/NAME and eval_recall/NAME per class)."""
  if task == "classify":
    return ("eval_loss", "eval_accuracy", "eval_macro_f1")
  return ("eval_loss", "eval_perplexity", "eval_accuracy") + (
    ("bleu",) if task == "translation" else ()
  )


def check_best_metric(cfg) -> None:
  metric, allowed = cfg.checkpoint.best_metric, task_metrics(cfg.task)
  if metric == "bleu" and cfg.task == "translation" and not cfg.eval.bleu:
    _fail("checkpoint.best_metric", "'bleu' needs eval.bleu=True")
  if not metric or metric in allowed:
    return
  kind, _, name = metric.partition("/")
  if cfg.task == "classify" and kind in ("eval_precision", "eval_recall"):
    names = label_names(cfg.data.labels)
    if name and (not names or name in names):
      return
    _fail("checkpoint.best_metric", f"{metric!r}: no class {name!r}; classes are {names}")
  _fail(
    "checkpoint.best_metric",
    f"{metric!r} is not reported for task {cfg.task!r}; choose one of {', '.join(allowed)}"
    + (", eval_precision/CLASS, eval_recall/CLASS" if cfg.task == "classify" else ""),
  )


def label_names(labels: str) -> list[str]:
  """data.labels as a list of names ("" = none given)."""
  return [name.strip() for name in labels.split(",")] if labels.strip() else []


def _validate_training(cfg: ml_collections.ConfigDict) -> None:
  m = cfg.model
  for field in ("total_steps", "log_every"):
    _check_positive(cfg, "train." + field)
  _check_choice(cfg, "train.on_nan", ("skip", "halt"))
  _check_positive(cfg, "train.sync_every", allow_zero=True)
  _check_choice(cfg, "train.outer_optimizer", ("average", "nesterov"))
  _check_positive(cfg, "train.outer_lr")
  if not 0.0 <= cfg.train.outer_momentum < 1.0:
    _fail("train.outer_momentum", f"{cfg.train.outer_momentum!r} must lie in [0, 1)")
  if not 0.0 <= cfg.train.distill_weight <= 1.0:
    _fail("train.distill_weight", f"{cfg.train.distill_weight!r} must lie in [0, 1]")
  _check_positive(cfg, "train.distill_temperature")
  if cfg.mesh.stage * cfg.mesh.dcn_stage > 1:
    for field in ("train.sync_every", "train.teacher"):
      if value := _lookup(cfg, field):
        _fail(field, f"{value!r} is not supported with pipeline stages; set mesh.stage=1")
  if cfg.train.teacher and cfg.train.sync_every:
    _fail("train.sync_every", "local SGD does not run a teacher; set it to 0 to distill")
  adapting = cfg.train.trainable or m.lora_rank or m.adapter_dim
  if adapting and cfg.train.sync_every:
    _fail("train.sync_every", "local SGD trains every parameter; set it to 0 to freeze some")
  _check_positive(cfg, "checkpoint.every", allow_zero=True)
  _check_positive(cfg, "checkpoint.keep")
  check_best_metric(cfg)
  _check_choice(cfg, "checkpoint.on_corrupt", ("fallback", "fail"))
  if cfg.checkpoint.best_metric and not cfg.eval.every:
    _fail("checkpoint.best_metric", "needs periodic evaluation; set eval.every")
  _check_choice(cfg, "optim.name", OPTIMIZERS)
  _check_choice(cfg, "optim.schedule", SCHEDULES)
  _check_positive(cfg, "optim.learning_rate")
  for field in ("warmup_steps", "weight_decay", "clip_norm", "end_fraction", "eps"):
    _check_positive(cfg, "optim." + field, allow_zero=True)
  if cfg.optim.weight_decay and cfg.optim.name not in ("adamw", "adafactor"):
    _fail(
      "optim.weight_decay",
      f"{cfg.optim.weight_decay!r} is applied only by adamw and adafactor (decoupled, not to "
      f"norms or biases), not by {cfg.optim.name}; set optim.name=adamw or weight_decay=0",
    )
  for field in ("b1", "b2", "momentum"):
    if not 0.0 <= cfg.optim[field] < 1.0:
      _fail("optim." + field, f"{cfg.optim[field]!r} must lie in [0, 1)")
