"""Fine-tuning a Hugging Face model with LoRA under ZeRO-3: opus-mt (Marian) on a TSV file of
translations (variant `marian`, the default) or GPT-2 on a text file (variant `lm`).

The model, its shape and its tokenizer come from `train.init_from` (an hf: source; the default
is the real hub model, downloaded when a network exists; offline it is a one-line error asking
for a local directory); `data.tokenizer` stays empty. Set `data.source` to your file
(translation: source<TAB>target per line; LM: one document per line); the first
`data.eval_examples` (500) lines are held out for evaluation unless `data.eval_source` names a
separate file. LoRA of rank 8 sits beside every attention and MLP projection, the base weights
frozen; the parameters, LoRA's factors and their optimizer state are sharded over every device
(fsdp, zero_stage 3). The run evaluates the imported model at step 0, then every 500 steps:
eval_loss, and sacreBLEU of beam-4 translations (marian) or perplexity (lm).

  python -m experiments.run --config=experiments/finetune_hf.py:marian --workdir=runs/opus \\
    --config.train.init_from=hf:Helsinki-NLP/opus-mt-en-de --config.data.source=tsv:/data/train.tsv
  python -m experiments.run --mode=eval --workdir=runs/opus
  python -m experiments.run --mode=export --workdir=runs/opus --format=hf --output=runs/opus_hf
  python -m experiments.run --mode=serve --workdir=runs/opus

  python -m experiments.run --config=experiments/finetune_hf.py:lm --workdir=runs/gpt2 \\
    --config.train.init_from=hf:openai-community/gpt2 --config.data.source=text:/data/train.txt

The export (LoRA merged into the kernels) loads with transformers' MarianMTModel /
GPT2LMHeadModel.from_pretrained and its tokenizer with AutoTokenizer.from_pretrained; hf:DIR is
also accepted by --export for eval, decode and serve (with the defaults' data.seq_len, 64, as
the longest input unless --config.data.seq_len says otherwise). On a machine without network,
download the model elsewhere (`huggingface-cli download Helsinki-NLP/opus-mt-en-de`) and pass
hf:/path/to/its/directory. See docs/pretrained.md.

Hardware: one GPU or TPU chip for either: opus-mt-en-de has 73.9M parameters and 1.08M LoRA
ones, gpt2 124.5M and 1.33M (counted from their shapes).

Measured on a 2-core CPU with a random-weight tiny model (tests/test_hf_workflow.py: Marian
d_model 32, 2+2 layers, 80 token ids; 4 CPU devices, fsdp=4, zero_stage 3; 30 steps of 16 rows
of 48 tokens on 384 generated word-for-word pairs, 16 more held out): training loss (smoothed)
4.466 -> 4.421, eval loss 4.482 -> 4.424, sacreBLEU 0.0 at step 0 and 0.0 after 30 steps (the
random model translates every line as a run of one piece, before and after: 30 steps check the
workflow, not quality); the training run took 26-36 s (two runs), 9-12 s of it compiling the
step, and the whole test (train, eval, export, decode, serve) 62-90 s. The merged hf export's
logits equal the fine-tuned model's to 1e-4 and its eval loss is the run's. Variant `lm`
(GPT-2, n_embd 32, 2 layers): eval perplexity 325.0 -> 321.4 in 30 steps, 14-22 s. Nothing was
measured on the real models (no network there).
"""

from lm import config as lmc

# What a variant must be given: its hub model by default (or --config.train.init_from=hf:DIR)
# and a data file, whose placeholder fails in one line until set.
MODELS = {"marian": "hf:Helsinki-NLP/opus-mt-en-de", "lm": "hf:openai-community/gpt2"}
SOURCES = {"marian": "tsv:/path/to/train.tsv", "lm": "text:/path/to/train.txt"}


def get_config(variant: str = "marian"):
  if variant not in MODELS:
    raise ValueError(f"variant {variant!r}: choose 'marian' or 'lm'")
  cfg = lmc.translation_defaults() if variant == "marian" else lmc.lm_defaults()
  cfg.train.init_from = MODELS[variant]
  cfg.data.source = SOURCES[variant]
  cfg.data.eval_examples = 500
  cfg.zero_stage = 3
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  # LoRA (Hu et al. 2021) on every projection: B starts at zero, so step 0 is the import.
  cfg.model.update(lora_rank=8, lora_alpha=16.0, lora_targets=".")
  # Dropout 0.1: opus-mt's config.json (dropout) and GPT-2's (resid/embd/attn_pdrop) train
  # with it; the import leaves it to the run (adopt_model takes only the shape fields).
  cfg.model.dropout_rate = 0.1
  # Linear warmup, then linear decay to 0, and AdamW's b2, eps and weight decay (none) as
  # transformers' Trainer has them: what fine-tunes of these models are usually run with.
  cfg.optim.update(name="adamw", schedule="linear", warmup_steps=100, weight_decay=0.0)
  cfg.optim.update(b2=0.999, eps=1e-8, clip_norm=1.0)
  cfg.train.update(total_steps=2000, log_every=50)
  cfg.eval.update(every=500, examples=4)
  cfg.checkpoint.update(every=500, keep=2)
  if variant == "marian":
    # Label smoothing 0.1, as Marian trained opus-mt; 128 tokens hold a typical sentence (a
    # longer one is cut, data.too_long); 32 packed rows of 128 take some 100-200 pairs a step.
    cfg.model.label_smoothing = 0.1
    cfg.data.seq_len = 128
    cfg.train.global_batch_size = 32
    # LoRA's update starts at zero and is low-rank: it takes a larger rate than a full
    # fine-tune would.
    cfg.optim.learning_rate = 5e-4
    cfg.decode.beam_size = 4  # opus-mt's generation settings: 4 beams
  else:
    # The LoRA paper's GPT-2 rate (2e-4, E2E); documents longer than 512 tokens split into
    # pieces rather than cut, so that all of the text trains.
    cfg.model.label_smoothing = 0.0
    cfg.data.update(seq_len=512, too_long="split")
    cfg.train.global_batch_size = 16
    cfg.optim.learning_rate = 2e-4
  return cfg
