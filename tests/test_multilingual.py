"""Several translation directions in one model: pair sources, target tags, the temperature mix,
per-pair eval, and decode / serve into a requested target language."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from experiments import demo
from lm import api
from lm import train as lm_train
from lm.config import ConfigError
from lm.data import multilingual, pipeline, synthetic
from tests.helpers import (
  ROOT,
  RUN_IMPORTS,
  chromium,
  forked_command_lines,
  page_output,
  serve_process,
  tiny_config,
)
from tests.test_data import _global_batches

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _write_pair(path, rows: int, seed: int, marker: str) -> None:
  """Reversal pairs whose targets end in `marker`, so a record's pair shows in its target."""
  rng = np.random.RandomState(seed)
  lines = []
  for _ in range(rows):
    words = list(rng.choice(WORDS, size=rng.randint(2, 6)))
    lines.append(f"{' '.join(words)}\t{' '.join(reversed(words))} {marker}\n")
  path.write_text("".join(lines))


def _pairs_config(tmp_path, sizes=(400, 100, 30), **data):
  specs = []
  for n, (lang, size) in enumerate(zip(("xa", "xb", "xc"), sizes)):
    _write_pair(tmp_path / f"{lang}.tsv", size, n, lang)
    specs.append(f"en-{lang}={tmp_path / f'{lang}.tsv'}")
  cfg = tiny_config("translation")
  cfg.data.update(source="tsv:" + ",".join(specs), eval_examples=8, spm_model_type="word")
  cfg.data.update(prefetch=0, **data)
  cfg.model.vocab_size = 64
  return cfg


def test_pair_specs_parse_and_plain_ones_name_no_pairs():
  pairs = multilingual.parse("tsv:en-de=/d/de.tsv,jsonl:en-fr=fr.jsonl,de-en=x.jsonl")
  assert [(p.name, p.spec) for p in pairs] == [
    ("en-de", "tsv:/d/de.tsv"),
    ("en-fr", "jsonl:fr.jsonl"),
    ("de-en", "jsonl:x.jsonl"),  # the kind before carries over
  ]
  tfds_pairs = multilingual.parse(
    "tfds:en-de=wmt14_translate/de-en:train,en-fr=wmt14_translate/fr-en"
  )
  assert [p.spec for p in tfds_pairs] == [
    "tfds:wmt14_translate/de-en:train",
    "tfds:wmt14_translate/fr-en",
  ]
  assert [p.name for p in multilingual.parse("synthetic:demo_multi")] == ["en-xa", "en-xb"]
  for plain in ("tsv:/data/train.tsv", "tfds:wmt14_translate/de-en:train", "synthetic:demo"):
    assert not multilingual.names_pairs(plain)
  cfg = demo.get_config("multi_tiny")
  assert multilingual.target_languages(cfg) == ("xa", "xb")
  assert multilingual.target_languages(demo.get_config("tiny")) == ()


@pytest.mark.parametrize(
  "source,message",
  [
    ("tsv:en-de=a.tsv,fr=b.tsv", "'fr=b.tsv' .* is not a pair; write KIND:SRC-TGT=ARG"),
    ("tsv:en-de=a.tsv,,en-fr=b.tsv", "'' .* is not a pair"),
    ("tsv:en-de=a.tsv,en-de=b.tsv", "pair en-de is named twice"),
    ("tsv:en-de={tmp}/missing.tsv,en-fr={tmp}/fr.tsv", "no file matches"),
    ("ftp:en-de=x,en-fr=y", "unknown kind 'ftp'"),
  ],
)
def test_malformed_pair_specs_fail_in_one_line_naming_data_source(tmp_path, source, message):
  _write_pair(tmp_path / "fr.tsv", 20, 0, "fr")
  cfg = tiny_config("translation")
  cfg.data.source = source.format(tmp=tmp_path)
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.load(cfg, str(tmp_path / "run"))
  assert "\n" not in str(error.value) and str(error.value).startswith("config.data.source: ")


def test_pairs_refuse_data_direction_and_the_lm_task(tmp_path):
  cfg = _pairs_config(tmp_path, direction="en->de")
  with pytest.raises(ConfigError, match="config.data.direction: the pairs in data.source"):
    pipeline.load(cfg, str(tmp_path / "run"))
  cfg = _pairs_config(tmp_path)
  cfg.task = "lm"
  with pytest.raises(ConfigError, match="config.data.source: pairs are for task 'translation'"):
    pipeline.load(cfg, str(tmp_path / "run"))


def test_tags_are_one_token_each_and_held_out_examples_come_per_pair(tmp_path):
  cfg = _pairs_config(tmp_path)
  data = pipeline.load(cfg, str(tmp_path / "run"))
  for lang in ("xa", "xb", "xc"):
    ids = data.tokenizer.encode(multilingual.tag(lang))
    assert len(ids) == 1 and data.tokenizer.decode(ids) == f"<2{lang}>"
  assert data.eval_pairs == ["en-xa", "en-xb", "en-xc"] * 8  # in turn: logged examples show all
  for record, pair in zip(data.eval_records, data.eval_pairs, strict=True):
    lang = pair.split("-")[1]
    assert record["inputs"].startswith(f"<2{lang}> ") and record["targets"].endswith(lang)
  for i in range(0, len(data.train), 37):  # every training source carries its target's tag
    record = data.train[i]
    assert record["inputs"].split()[0] == f"<2{record['targets'].split()[-1]}>"
  # Held out means not trained on: the mix reads each pair's examples from eval_examples on.
  sizes = data.source.sizes.tolist()
  assert sizes == [400 - 8, 100 - 8, 30 - 8]


def test_a_given_tokenizer_without_the_tags_is_refused(tmp_path):
  plain = tiny_config("translation")
  _write_pair(tmp_path / "plain.tsv", 100, 0, "xa")
  plain.data.update(source=f"tsv:{tmp_path / 'plain.tsv'}", eval_examples=8, spm_model_type="word")
  pipeline.load(plain, str(tmp_path / "plain_run"))  # trains a tokenizer without tags
  cfg = _pairs_config(tmp_path, tokenizer=str(tmp_path / "plain_run" / "tokenizer.model"))
  with pytest.raises(ConfigError, match="config.data.tokenizer: it has no token for the target"):
    pipeline.load(cfg, str(tmp_path / "run"))


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_pair_frequencies_over_10000_examples_follow_the_temperature(tmp_path, temperature):
  cfg = _pairs_config(tmp_path, mix_temperature=temperature)
  data = pipeline.load(cfg, str(tmp_path / "run"))
  sizes = np.array([400 - 8, 100 - 8, 30 - 8], np.float64)
  expected = sizes ** (1 / temperature) / (sizes ** (1 / temperature)).sum()
  # The order the training lanes take their examples from (pipeline.TrainIterator).
  order = data.train.shuffle(seed=cfg.seed).repeat()
  counts = dict.fromkeys(("xa", "xb", "xc"), 0)
  for i in range(10_000):
    counts[order[i]["targets"].split()[-1]] += 1
  frequencies = np.array(list(counts.values())) / 10_000
  np.testing.assert_allclose(frequencies, expected, atol=0.02)
  if temperature > 1:  # the small pair is drawn far above its share of the examples
    assert frequencies[2] > 2 * sizes[2] / sizes.sum()
  # One pass over the mix holds every training example of every pair.
  mixed = data.source
  seen = {lang: set() for lang in counts}
  for i in range(len(mixed)):
    record = mixed[i]
    seen[record["targets"].split()[-1]].add(record["inputs"])
  assert [len(s) for s in seen.values()] == [
    len({mixed.parts[p][i]["inputs"] for i in range(8, len(mixed.parts[p]))}) for p in range(3)
  ]


def test_mixed_batches_and_resume_do_not_depend_on_the_process_count(tmp_path):
  cfg = _pairs_config(tmp_path, mix_temperature=2.0, seq_len=16)
  cfg.train.global_batch_size = 4
  data = pipeline.load(cfg, str(tmp_path / "run"))
  reference, _ = _global_batches(data, 1, 30)
  for processes in (2, 4):
    batches, _ = _global_batches(data, processes, 30)
    for got, want in zip(batches, reference, strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  _, states = _global_batches(data, 2, 12)
  resumed, _ = _global_batches(data, 4, 18, state=pipeline.merge_states(states, own=None))
  for got, want in zip(resumed, reference[12:], strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_mocked_tfds_pairs_load_and_train_with_per_pair_losses(tmp_path):
  cfg = tiny_config("translation")
  cfg.data.update(
    source="tfds:en-de=wmt14_translate/de-en,en-fr=wmt14_translate/fr-en:train",
    eval_examples=8,
    tokenizer_sample=64,
  )
  cfg.model.vocab_size = 128
  cfg.train.update(total_steps=3, log_every=1)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.eval.update(bleu=False, examples=0)
  with tfds.testing.mock_data(num_examples=64):
    data = pipeline.load(cfg, str(tmp_path / "data"))
    assert data.eval_pairs == ["en-de", "en-fr"] * 8
    assert all(r["inputs"].startswith(("<2de> ", "<2fr> ")) for r in data.eval_records)
    results = lm_train.train(cfg, str(tmp_path / "run"))
  for pair in ("en-de", "en-fr"):
    assert np.isfinite(results[f"eval_loss/{pair}"])
  mean = (results["eval_loss/en-de"] + results["eval_loss/en-fr"]) / 2
  assert results["eval_loss"] == pytest.approx(mean)


# -- a trained two-language model: per-pair metrics, decode and serve into each language --------


@pytest.fixture(scope="module")
def multi_workdir(tmp_path_factory):
  """experiments/demo.py:multi_tiny (40 steps) on fsdp over the 8 devices."""
  workdir = tmp_path_factory.mktemp("demo_multi")
  cfg = demo.get_config("multi_tiny")
  cfg.data.update(eval_examples=16)
  cfg.mesh.update(data=1, fsdp=8)
  cfg.eval.examples = 0
  lm_train.train(cfg, str(workdir))
  return workdir


def _tensorboard_tags(directory) -> set[str]:
  """Scalar tags in the TFRecord event files of `directory` (tensorboardX writes them)."""
  tags = set()
  for path in directory.glob("events.out.tfevents.*"):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset : offset + 8])
      event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
      tags |= {value.tag for value in event.summary.value}
      offset += 12 + length + 4
  return tags


def test_per_pair_bleu_and_loss_reach_metrics_jsonl_and_tensorboard(multi_workdir):
  lines = [json.loads(line) for line in open(multi_workdir / "metrics.jsonl")]
  final = [m for m in lines if "bleu" in m][-1]
  for pair in ("en-xa", "en-xb"):
    assert 0 <= final[f"bleu/{pair}"] <= 100 and np.isfinite(final[f"eval_loss/{pair}"])
  assert final["bleu"] == pytest.approx((final["bleu/en-xa"] + final["bleu/en-xb"]) / 2)
  assert final["eval_loss"] == pytest.approx(
    (final["eval_loss/en-xa"] + final["eval_loss/en-xb"]) / 2
  )
  assert final["eval_perplexity"] == pytest.approx(np.exp(final["eval_loss"]))
  tags = _tensorboard_tags(multi_workdir / "tb")
  assert {"bleu", "bleu/en-xa", "bleu/en-xb", "eval_loss/en-xa", "eval_loss/en-xb"} <= tags


def _run(*args, input_text=None):
  return subprocess.run(
    [sys.executable, "-m", "experiments.run", *args],
    cwd=ROOT,
    input=input_text,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_the_service_translates_into_each_language_as_decode_target_lang_does(
  multi_workdir, tmp_path
):
  source = synthetic.DemoSource(6, 23)
  lines = [source[i][0] for i in range(6)]
  decoded = {}
  for lang in ("xa", "xb"):
    done = _run(
      "--mode=decode",
      f"--workdir={multi_workdir}",
      f"--target_lang={lang}",
      "--output=-",
      input_text="\n".join(lines) + "\n",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    decoded[lang] = done.stdout.splitlines()
    assert len(decoded[lang]) == len(lines)
  assert decoded["xa"] != decoded["xb"]  # the tag decides the language
  with serve_process(f"--workdir={multi_workdir}") as (_, url):
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert info["target_languages"] == ["xa", "xb"]
    if chromium():  # the page's language menu
      for lang in ("xa", "xb"):
        shown = page_output(url, lines[0], tmp_path / f"profile_{lang}", choice=lang)
        assert shown == decoded[lang][0], lang
    for lang in ("xa", "xb"):
      response = httpx.post(
        f"{url}/v1/translate", json={"text": lines, "target_lang": lang}, timeout=120
      )
      assert response.status_code == 200, response.text
      assert response.json()["translations"] == decoded[lang]
      single = httpx.post(
        f"{url}/v1/translate", json={"text": lines[0], "target_lang": lang}, timeout=120
      )
      assert single.json()["translations"] == decoded[lang][:1]
    for body, message in [
      ({"text": "a cat", "target_lang": "xq"}, "target_lang: 'xq' is not a target language"),
      ({"text": "a cat"}, "target_lang: required: name one of xa, xb"),
      ({"text": "a cat", "target_lang": 5}, "target_lang must be a string"),
    ]:
      refused = httpx.post(f"{url}/v1/translate", json=body, timeout=30)
      assert refused.status_code == 400
      assert refused.json()["error"]["field"] == "target_lang"
      assert message in refused.json()["error"]["message"]
    # OpenAI's completions take the same field: greedy, as /v1/translate with beam_size 1.
    for lang in ("xa", "xb"):
      greedy = httpx.post(
        f"{url}/v1/translate",
        json={"text": lines[0], "target_lang": lang, "beam_size": 1},
        timeout=120,
      ).json()["translations"][0]
      completion = httpx.post(
        f"{url}/v1/completions",
        json={"model": "zerolm", "prompt": lines[0], "target_lang": lang, "temperature": 0},
        timeout=120,
      )
      assert completion.status_code == 200, completion.text
      assert completion.json()["choices"][0]["text"] == greedy
    refused = httpx.post(
      f"{url}/v1/completions", json={"model": "zerolm", "prompt": "a cat", "temperature": 0}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "target_lang"


BAD_TARGET_LANGS = [
  (["--mode=decode", "--target_lang=xq"], "--target_lang: 'xq' is not a target language"),
  (["--mode=decode"], "--target_lang: required: name one of xa, xb"),
  (["--mode=eval", "--target_lang=xa"], "--target_lang: only --mode=decode takes it"),
]


def test_a_bad_target_lang_is_one_line_before_the_model_loads(multi_workdir, tmp_path):
  """Each a child of one process that imported experiments.run (tests/helpers.py:
  forked_command_lines), as `python -m experiments.run` but for the imports."""
  argvs = [[f"--workdir={multi_workdir}", *args] for args, _ in BAD_TARGET_LANGS]
  results = forked_command_lines("experiments.run", argvs, tmp_path, RUN_IMPORTS)
  for (returncode, stderr), (_, message) in zip(results, BAD_TARGET_LANGS, strict=True):
    assert returncode == 2 and stderr.count("\n") == 1, stderr[-2000:]
    assert message in stderr


def test_a_single_pair_model_takes_no_target_lang():
  with pytest.raises(api.RequestError, match="translates one direction") as error:
    api.target_language({"target_lang": "de"}, ())
  assert error.value.status == 400 and error.value.field == "target_lang"
  assert api.target_language({}, ()) is None
  assert api.target_language({}, ("en",)) is None  # one target language: the default
  assert multilingual.prefixed("a cat", ("en",), None) == "<2en> a cat"
  assert multilingual.prefixed("a cat", (), None) == "a cat"
