"""experiments/finetune_hf.py end to end through the command line, on a random-weight tiny
Marian model saved here: LoRA fine-tuning under ZeRO-3, eval, export to a transformers
checkpoint, decode and serve from that export."""

import concurrent.futures
import contextlib
import json
import os
import random
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

from lm import config as lmc
from lm import inference
from lm.hf import architectures
from lm.trees import param_paths
from tests import hf_fixtures
from tests.helpers import serve_process
from tests.hf_fixtures import transformers

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4  # the subprocesses' mesh: fsdp=4 under ZeRO-3
# Words of hf_fixtures.ENGLISH and GERMAN, which the tiny tokenizer knows, word for word.
WORDS = {
  "The": "Der",
  "quick": "schnelle",
  "brown": "braune",
  "fox": "Fuchs",
  "jumps": "springt",
  "over": "über",
  "the": "den",
  "lazy": "faulen",
  "dog": "Hund",
  "Hello": "Hallo",
  "world": "Welt",
  "numbers": "Zahlen",
  "and": "und",
  "in": "in",
  "a": "einem",
  "sentence": "Satz",
  "12345": "12345",
  "67890": "67890",
}
STEPS = 30
# Small enough for 2 cores: 16 rows of 48 tokens (the longest pair, 42 tokens, whole: as the
# export, whose data.seq_len is 64, reads it), 16 held-out pairs, evaluated at step 0 and at
# the end.
TRAIN = [
  f"--config.train.total_steps={STEPS}",
  "--config.train.global_batch_size=16",
  "--config.train.log_every=5",
  "--config.data.seq_len=48",
  "--config.data.eval_examples=16",
  "--config.eval.every=0",
  "--config.optim.warmup_steps=5",
]
# decode and serve of the export (whose data.seq_len is 64): one source width and 4 rows both,
# so that both run the same programs.
DECODING = [
  "--config=experiments/finetune_hf.py:marian",
  "--config.decode.length_buckets=(48,)",
  "--config.decode.batch_size=4",
  "--config.serve.max_batch=4",
]


def _pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
  rng, words = random.Random(seed), sorted(WORDS)
  out = []
  for _ in range(count):
    sentence = [rng.choice(words) for _ in range(rng.randint(3, 7))]
    out.append((" ".join(sentence), " ".join(WORDS[w] for w in sentence)))
  return out


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  result = subprocess.run(
    [sys.executable, "-m", "experiments.run", *args],
    cwd=ROOT,
    env=env,
    input="",
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


@contextlib.contextmanager
def _server(*args):
  """--mode=serve on DEVICES devices in a subprocess and its base URL."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  with serve_process(*args, env=env) as (_, url):
    yield url


def _leaves(tree) -> dict:
  """{path: array} of a parameter tree."""
  return dict(zip(jax.tree.leaves(param_paths(tree)), jax.tree.leaves(tree), strict=True))


def _batch(tokenizer, pairs) -> dict:
  """The pairs' ids (with EOS) padded to 16, segment ids marking the real tokens."""
  batch = {}
  for side, texts in (("inputs", [s for s, _ in pairs]), ("targets", [t for _, t in pairs])):
    rows = [(tokenizer.encode(text, side) + [tokenizer.eos_id])[:16] for text in texts]
    ids = np.full((len(rows), 16), tokenizer.pad_id, np.int32)
    for i, row in enumerate(rows):
      ids[i, : len(row)] = row
    batch[side] = ids
    batch[f"{side}_segment_ids"] = (np.arange(16) < np.array([len(r) for r in rows])[:, None]) * 1
  return batch


def _logits(layout, params, batch):
  with jax.set_mesh(layout.mesh):
    out = jax.jit(layout.logits)(params, layout.shard_batch(batch))
  return np.asarray(jax.device_get(out))


def test_marian_lora_fine_tune_eval_export_decode_and_serve(tmp_path):
  """The variant's fine-tune of an hf: import trains only LoRA; --mode=eval repeats the run's
  final metrics; the hf export is the fine-tuned model (its logits in transformers, its eval
  loss read back by --export into a new workdir) with a tokenizer transformers loads; decode and
  serve of it agree."""
  base = tmp_path / "opus"
  imported = hf_fixtures.save_model("marian", base)
  data = tmp_path / "train.tsv"
  data.write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(400)))
  workdir = str(tmp_path / "run")

  started = time.time()
  trained = _cli(
    "--config=experiments/finetune_hf.py:marian",
    f"--workdir={workdir}",
    f"--config.train.init_from=hf:{base}",
    f"--config.data.source=tsv:{data}",
    *TRAIN,
    "--config.decode.length_buckets=(48,)",  # one beam-search program for the evaluations
  )
  train_seconds = time.time() - started
  mesh = f"mesh {{'stage': 1, 'data': 1, 'fsdp': {DEVICES}, 'tensor': 1}}, zero_stage 3"
  assert mesh in trained.stdout
  with open(f"{workdir}/metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  losses = [m["loss"] for m in logged if "loss" in m]
  evals = [m for m in logged if "eval_loss" in m]
  assert len(losses) == STEPS // 5 and losses[-1] < losses[0], losses
  assert [m["step"] for m in evals] == [0, STEPS]  # the import, then the fine-tuned model
  assert all("bleu" in m for m in evals) and evals[-1]["eval_loss"] < evals[0]["eval_loss"]

  # The eval and the export of the checkpoint run at once (2 processes for 2 cores), and this
  # process checks the checkpoint meanwhile: LoRA factors that trained beside base weights
  # bitwise the import's.
  export = tmp_path / "opus_tuned"
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    evaluating = pool.submit(_cli, "--mode=eval", f"--workdir={workdir}")
    exporting = pool.submit(
      _cli, "--mode=export", f"--workdir={workdir}", "--format=hf", f"--output={export}"
    )
    layout, tuned, tokenizer, step = inference.restore_latest(workdir)
    assert step == STEPS and layout.cfg.model.lora_rank == 8
    _, original, _, _ = inference.restore_export(f"hf:{base}")
    tuned_leaves, original_leaves = _leaves(tuned), _leaves(original)
    lora = {p: x for p, x in tuned_leaves.items() if "_lora/" in p}
    blocks = {p.split("/")[-2] for p in lora}  # every projection of every block has its factors
    assert {"query_lora", "key_lora", "value_lora", "out_lora", "wi_lora", "wo_lora"} <= blocks
    assert any(p.startswith("decoder/layers/cross_attn/") for p in lora)
    assert all(np.abs(np.asarray(x)).max() > 0 for p, x in lora.items() if p.endswith("/b"))
    assert set(tuned_leaves) - set(lora) == set(original_leaves)
    for path, x in original_leaves.items():
      np.testing.assert_array_equal(np.asarray(tuned_leaves[path]), np.asarray(x), err_msg=path)
    evaluating.result(), exporting.result()
  with open(f"{workdir}/eval.json") as f:
    evaluated = json.load(f)
  assert evaluated["step"] == STEPS
  np.testing.assert_allclose(evaluated["eval_loss"], evals[-1]["eval_loss"], rtol=1e-5)
  assert evaluated["bleu"] == pytest.approx(evals[-1]["bleu"])

  # The hf export, read back by --export (into a new workdir): its eval on the same held-out
  # pairs, --mode=decode and --mode=serve, at once; this process meanwhile holds the export to
  # transformers.
  pairs = _pairs(8, seed=1)
  lines = [source for source, _ in pairs[:3]]
  (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in lines))
  served = [f"--workdir={tmp_path / 'from_export'}", f"--export=hf:{export}", *DECODING]
  held_out = [f"--config.data.eval_source=tsv:{data}", "--config.data.eval_examples=16"]

  def serve():
    with _server(*served) as url:
      return httpx.post(f"{url}/v1/translate", json={"text": lines}, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    evaluating = pool.submit(_cli, "--mode=eval", *served, *held_out, "--config.eval.bleu=false")
    decoding = pool.submit(
      _cli,
      "--mode=decode",
      *served,
      f"--input={tmp_path / 'in.txt'}",
      f"--output={tmp_path / 'out'}",
    )
    serving = pool.submit(serve)
    theirs = transformers.MarianMTModel.from_pretrained(export).eval()
    batch = _batch(tokenizer, pairs)
    real = batch["targets_segment_ids"].astype(bool)
    start = layout.cfg.model.start_id
    ours = _logits(layout, tuned, batch)[..., : tokenizer.vocab_size]
    merged = hf_fixtures.logits(theirs, batch, start)
    np.testing.assert_allclose(merged[real], ours[real], atol=1e-4, rtol=0)
    before = hf_fixtures.logits(imported, batch, start)
    assert np.abs(merged[real] - before[real]).max() > 1e-2  # LoRA's updates are in the export
    their_tokenizer = transformers.MarianTokenizer.from_pretrained(export)
    eos = [tokenizer.eos_id]
    for source, target in pairs:
      assert their_tokenizer(source).input_ids == tokenizer.encode(source, "inputs") + eos
      assert their_tokenizer(text_target=target).input_ids == tokenizer.encode(target) + eos
    evaluating.result(), decoding.result()
    response = serving.result()
  with open(tmp_path / "from_export" / "eval.json") as f:
    np.testing.assert_allclose(json.load(f)["eval_loss"], evals[-1]["eval_loss"], rtol=1e-4)
  decoded = (tmp_path / "out").read_text().splitlines()
  assert len(decoded) == 3 and all(decoded), decoded
  assert response.status_code == 200, response.text
  assert response.json()["translations"] == decoded
  print(  # experiments/finetune_hf.py's figures (pytest -s)
    f"\nmarian: {STEPS} steps, the training run {train_seconds:.0f}s, loss {losses[0]:.3f} -> "
    f"{losses[-1]:.3f}, eval_loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}, "
    f"bleu {evals[0]['bleu']:.2f} -> {evals[-1]['bleu']:.2f}; decoded {decoded}; "
    + " ".join(line for line in trained.stdout.splitlines() if "compiled in" in line)
  )


def test_gpt2_lora_fine_tune_reports_perplexity(tmp_path):
  """The `lm` variant on a text file: the import evaluated at step 0, then trained."""
  base = tmp_path / "gpt2"
  hf_fixtures.save_model("gpt2", base)
  data = tmp_path / "train.txt"
  data.write_text("".join(f"{source}\n" for source, _ in _pairs(300)))
  workdir = str(tmp_path / "run")
  started = time.time()
  trained = _cli(
    "--config=experiments/finetune_hf.py:lm",
    f"--workdir={workdir}",
    f"--config.train.init_from=hf:{base}",
    f"--config.data.source=text:{data}",
    *TRAIN,
    "--config.eval.examples=0",  # no continuations: only the teacher-forced metrics
  )
  assert "zero_stage 3" in trained.stdout and "eval_perplexity" in trained.stdout
  with open(f"{workdir}/metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  losses = [m["loss"] for m in logged if "loss" in m]
  evals = [m for m in logged if "eval_perplexity" in m]
  # At LoRA's 2e-4 the training loss moves less in 30 steps than it varies between batches;
  # the held-out set is fixed.
  assert len(losses) == STEPS // 5 and np.isfinite(losses).all(), losses
  assert [m["step"] for m in evals] == [0, STEPS]
  assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
  print(
    f"\nlm: the training run {time.time() - started:.0f}s, loss {losses[0]:.3f} -> "
    f"{losses[-1]:.3f}, eval_perplexity {evals[0]['eval_perplexity']:.2f} -> "
    f"{evals[-1]['eval_perplexity']:.2f}"
  )


def test_an_hf_export_refuses_adapters():
  """transformers has no Houlsby adapters: an export would drop them and compute the base
  model, so it is refused before anything is read."""
  marian = dict(
    model_type="marian",
    vocab_size=80,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    pad_token_id=79,
  )
  gpt2 = dict(model_type="gpt2", vocab_size=80, n_embd=32, n_head=4, n_layer=2, n_positions=64)
  llama = dict(
    model_type="llama",
    vocab_size=80,
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=64,
  )
  for hf in (marian, gpt2, llama):
    cfg = architectures.model_config({**hf, "bos_token_id": 0}, "model")
    assert architectures.architecture_of(cfg) == hf["model_type"]
    cfg.model.adapter_dim = 4
    match = r"model\.adapter_dim=4 has no Hugging Face equivalent"
    with pytest.raises(lmc.ConfigError, match=match) as error:
      architectures.architecture_of(cfg)
    assert "\n" not in str(error.value)
