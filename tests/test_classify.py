"""task=classify: the pooled head on both bodies, its data, metrics, starting points and modes."""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from experiments import demo
from lm import checkpoint, classify_metrics, evaluate, inference, train
from lm import config as lmc
from lm.data import labelled, synthetic
from lm.train_step import Trainer
from lm.trees import param_paths
from tests.helpers import ROOT, chromium, page_output, serve_process, tiny_config

STEPS = 4


def _tiny(mesh=(1, 1, 1), stage: int = 0, microbatches: int = 2, body: str = "encoder"):
  cfg = tiny_config(
    "classify",
    dropout_rate=0.1,  # per-row keys: the same masks on any mesh
    label_smoothing=0.1,
    num_classes=3,
    classifier_body=body,
    pooling="mean" if body == "encoder" else "last",
  )
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.train.update(global_batch_size=16, microbatches=microbatches)
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6, weight_decay=0.1)
  return cfg


def _batch(cfg, seed: int) -> dict:
  """Rows of random lengths (padding token id 4: segment ids, not ids, mark it)."""
  rng = np.random.RandomState(seed)
  rows, width = cfg.train.global_batch_size, cfg.data.seq_len
  lengths = rng.randint(2, width + 1, rows)
  segments = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  tokens = np.where(segments > 0, rng.randint(5, cfg.model.vocab_size, (rows, width)), 4)
  labels = rng.randint(0, cfg.model.num_classes, rows)
  return {
    "inputs": tokens.astype(np.int32),
    "inputs_segment_ids": segments,
    "labels": labels.astype(np.int32),
  }


def _losses(cfg) -> list[float]:
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  run = Trainer.build(cfg, devices=jax.devices()[:n])
  state, step, losses = run.init_state(), run.compile_train_step(), []
  for seed in range(STEPS):
    state, metrics = step(state, run.layout.shard_batch(_batch(cfg, seed)))
    losses.append(float(metrics["loss"]))
    assert float(metrics["tokens"]) == cfg.train.global_batch_size  # normalised per example
  return losses


@functools.cache
def _reference(body: str) -> list[float]:
  return _losses(_tiny(body=body))


@pytest.mark.parametrize("body", ["encoder", "decoder"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_on_2x2x2_trains_like_one_device(body, stage):
  losses = _losses(_tiny((2, 2, 2), stage, body=body))
  np.testing.assert_allclose(losses, _reference(body), rtol=1e-5)
  assert losses[-1] < losses[0]


def test_the_head_is_sharded_and_padding_does_not_change_the_logits():
  cfg = _tiny(mesh=(1, 8, 1), stage=3)
  run = Trainer.build(cfg, devices=jax.devices())
  assert run.layout.logical["head"] == {"kernel": ("embed", "classes"), "bias": ("classes",)}
  assert run.layout.shardings.params["head"]["kernel"].spec == jax.sharding.PartitionSpec(
    "fsdp", None
  )
  params = run.init_state().params
  batch = _batch(cfg, 0)
  other = dict(batch, inputs=np.where(batch["inputs_segment_ids"] > 0, batch["inputs"], 9))
  with jax.set_mesh(run.layout.mesh):
    logits = [jax.jit(run.layout.logits)(params, run.layout.shard_batch(b)) for b in (batch, other)]
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), rtol=1e-6, atol=1e-6)


def test_metrics_equal_a_hand_computation():
  # true 0: 3 right, 1 as 1; true 1: 2 right, 2 as 2; true 2: 1 right; nothing predicted 0 wrongly
  labels = [0, 0, 0, 0, 1, 1, 1, 1, 2]
  predictions = [0, 0, 0, 1, 1, 1, 2, 2, 2]
  confusion = classify_metrics.confusion_matrix(np.array(labels), np.array(predictions), 3)
  np.testing.assert_array_equal(confusion, [[3, 1, 0], [0, 2, 2], [0, 0, 1]])
  s = classify_metrics.scores(confusion, ["a", "b", "c"])
  precision, recall = [1.0, 2 / 3, 1 / 3], [3 / 4, 2 / 4, 1.0]
  f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
  assert s["eval_accuracy"] == pytest.approx(6 / 9)
  assert s["eval_macro_f1"] == pytest.approx(sum(f1) / 3)
  for name, p, r in zip("abc", precision, recall):
    assert s[f"eval_precision/{name}"] == pytest.approx(p)
    assert s[f"eval_recall/{name}"] == pytest.approx(r)
  assert classify_metrics.scores([[0, 0], [2, 0]], ["x", "y"])["eval_precision/y"] == 0.0
  picture = classify_metrics.image(confusion)
  assert picture.shape == (72, 72, 3) and picture.dtype == np.uint8
  assert picture[12, 12].sum() < picture[12, 36].sum()  # the diagonal is darker


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(pooling="last"), r"config\.model\.pooling: 'last' is not one of 'mean', 'first'"),
    (dict(classifier_body="decoder"), r"config\.model\.pooling: 'mean' is not one of 'last'"),
    (dict(num_classes=2, labels="a,b,c"), r"config\.model\.num_classes: 2, but data\.labels"),
    (dict(labels="a,a"), r"config\.data\.labels: 'a,a' must name distinct"),
    (dict(pack=True), r"config\.data\.pack: a classification row holds one example"),
  ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(change, message):
  cfg = _tiny()
  for key, value in change.items():
    (cfg.data if key in ("labels", "pack") else cfg.model)[key] = value
  with pytest.raises(lmc.ConfigError, match=message):
    lmc.validate(cfg)


def test_files_skip_and_count_malformed_lines_and_unknown_labels(tmp_path):
  good = ["pos\tgreat film", "neg\tdull plot", "pos\tfine acting"]
  bad = ["no tab here", "pos\ttoo\tmany tabs", "neg\t   ", "\xff"]
  path = tmp_path / "train.tsv"
  path.write_bytes("\n".join(good + bad[:3] + ["meh\tunknown label"]).encode() + b"\n\xff\tx\n")
  data = _tiny().data
  source = labelled.open_labelled(f"tsv:{path}", data, 0)
  assert source.labels == ["meh", "neg", "pos"] and source.skipped == 4  # sorted from the data
  data.labels = "neg,pos"
  source = labelled.open_labelled(f"tsv:{path}", data, 0)
  assert source.skipped == 5 and len(source) == 3  # "meh" is not a label now
  assert source[1] == {"inputs": "dull plot", "label": 0}
  lines = [{"y": 1, "t": "one"}, {"y": 0, "t": "two"}, {"y": 7, "t": "x"}, {"t": "no label"}]
  (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
  data.update(labels="", fields="y,t")
  source = labelled.open_labelled(f"jsonl:{tmp_path}/train.jsonl", data, 0)
  assert source.labels == ["0", "1", "7"] and source.skipped == 2
  assert [source[i]["label"] for i in range(3)] == [1, 0, 2]


def test_imdb_reviews_loads_from_mocked_tfds():
  with tfds.testing.mock_data(num_examples=8):
    source = labelled.open_labelled("tfds:imdb_reviews", _tiny().data, 0)
    assert source.labels == ["neg", "pos"] and len(source) == 8
    assert isinstance(source[0]["inputs"], str) and source[0]["label"] in (0, 1)


def test_mocked_sst2_trains_five_steps(tmp_path):
  cfg = _tiny((2, 2, 2), microbatches=1)
  cfg.model.update(num_classes=0, vocab_size=96)
  cfg.data.update(source="tfds:glue/sst2", eval_examples=16, tokenizer_sample=64)
  cfg.train.update(total_steps=5, log_every=1, global_batch_size=8)
  with tfds.testing.mock_data(num_examples=64):
    results = train.train(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [m for m in map(json.loads, f) if "loss" in m]
  assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
  assert all(np.isfinite(m["loss"]) for m in lines)
  assert sum(map(sum, results["confusion_matrix"])) == 16
  saved = checkpoint.meta_config(inference.source_meta(str(tmp_path)))
  assert saved.data.labels == "negative,positive" and saved.model.num_classes == 2


def test_the_demo_variant_trains_on_a_users_tsv_file(tmp_path, capsys):
  rng = random.Random(0)
  rows = [synthetic.labelled_sentence(rng) for _ in range(200)]
  names = synthetic.CLASSIFY_LABELS
  lines = [f"{names[label]}\t{text}" for text, label in rows] + ["no tab", "odd\tlabel"]
  (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
  cfg = demo.get_config("classify_tiny")
  cfg.data.update(source=f"tsv:{tmp_path}/train.tsv", eval_examples=32, labels=",".join(names))
  cfg.train.total_steps = 3
  results = train.train(cfg, str(tmp_path / "run"))
  assert "data: skipped 2 malformed lines" in capsys.readouterr().out
  assert sum(map(sum, results["confusion_matrix"])) == 32


def test_init_from_a_translation_model_with_lora_trains_only_lora_and_the_head(
  trained_workdir, tmp_path
):
  cfg = demo.get_config("classify_tiny")
  cfg.model.update(lora_rank=4, lora_targets=".")
  cfg.train.update(init_from=str(trained_workdir), total_steps=3)
  cfg.optim.update(schedule="constant", learning_rate=1e-2)
  cfg.data.eval_examples = 16
  train.train(cfg, str(tmp_path))
  layout, tuned, _, _ = inference.restore_latest(str(tmp_path))
  _, source, _, _ = inference.restore_latest(str(trained_workdir))
  assert layout.cfg.model.d_model == 128 and layout.cfg.model.classifier_body == "encoder"
  fresh = Trainer.build(layout.cfg, tokenizer_size=layout.vocab_limit).layout.init_params()
  changed = set()
  for path, x in zip(jax.tree.leaves(param_paths(tuned)), jax.tree.leaves(tuned)):
    x, start = np.asarray(x), _at(source, path)
    start = np.asarray(_at(fresh, path) if start is None else start)
    if "_lora/" in path or path.startswith("head/"):
      changed.add(path) if not np.array_equal(x, start) else None
    else:  # frozen: the translation model's encoder and embedding, bitwise
      np.testing.assert_array_equal(x, start, err_msg=path)
  assert "head/kernel" in changed and any("_lora/" in p for p in changed)
  assert "decoder" not in tuned and "encoder" in tuned


def test_init_from_an_lm_puts_its_decoder_under_the_head(trained_lm_workdir, tmp_path):
  cfg = demo.get_config("classify_tiny")
  cfg.train.update(init_from=str(trained_lm_workdir), total_steps=2, trainable="^$")
  cfg.data.eval_examples = 16
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.zero_stage = 3
  results = train.train(cfg, str(tmp_path))
  layout, tuned, _, _ = inference.restore_latest(str(tmp_path))
  _, source, _, _ = inference.restore_latest(str(trained_lm_workdir))
  assert (layout.cfg.model.classifier_body, layout.cfg.model.pooling) == ("decoder", "last")
  for path, x in zip(jax.tree.leaves(param_paths(source)), jax.tree.leaves(source)):
    if _at(tuned, path) is not None:  # only the head trains ("^$" selects nothing else)
      np.testing.assert_array_equal(np.asarray(_at(tuned, path)), np.asarray(x), err_msg=path)
  assert "decoder" in tuned and np.isfinite(results["eval_loss"])


def _at(tree, path: str):
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory):
  """The classification demo (classify_tiny) on (2, 2, 2) ZeRO-2, evaluated every 10 steps, with
  checkpoint.best_metric=eval_macro_f1 (the saves need the metric)."""
  workdir = tmp_path_factory.mktemp("classify")
  cfg = demo.get_config("classify_tiny")
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.zero_stage = 2
  cfg.eval.every = 10
  cfg.checkpoint.best_metric = "eval_macro_f1"
  train.train(cfg, str(workdir))
  return workdir


def _images(workdir) -> dict[str, tuple[int, int]]:
  """TensorBoard image summaries: tag -> (height, width), read from the event files."""
  found = {}
  for name in os.listdir(workdir / "tb"):
    data = (workdir / "tb" / name).read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      event = event_pb2.Event.FromString(data[12 : 12 + length])
      data = data[16 + length :]
      for value in event.summary.value:
        if value.HasField("image"):
          found[value.tag] = (value.image.height, value.image.width)
  return found


def test_training_logs_the_metrics_and_a_confusion_image(classifier_workdir):
  with open(classifier_workdir / "metrics.jsonl") as f:
    evals = [m for m in map(json.loads, f) if "eval_macro_f1" in m]
  assert [m["step"] for m in evals] == [10, 20]
  last = evals[-1]
  confusion = np.array(last["confusion_matrix"])
  assert confusion.shape == (4, 4) and confusion.sum() == 64
  assert last["eval_accuracy"] == pytest.approx(np.trace(confusion) / 64)
  assert {f"eval_recall/{name}" for name in lmc.label_names(_labels(classifier_workdir))} <= set(
    last
  )
  assert _images(classifier_workdir) == {"confusion_matrix": (4 * 24, 4 * 24)}


def test_eval_mode_reports_the_last_evaluation_and_the_run_keeps_its_classes(
  classifier_workdir, tmp_path
):
  """--mode=eval's metrics are training's final evaluation's; config.json and the checkpoint
  name the classes found in the data; an hf export is refused in one line."""
  with open(classifier_workdir / "metrics.jsonl") as f:
    last = [m for m in map(json.loads, f) if "eval_macro_f1" in m][-1]
  results = evaluate.evaluate_workdir(str(classifier_workdir))
  assert results["step"] == last["step"] == 20
  assert results["confusion_matrix"] == last["confusion_matrix"]
  for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
    assert results[key] == pytest.approx(last[key], rel=1e-5), key
  saved = json.loads((classifier_workdir / "config.json").read_text())
  assert saved["data"]["labels"] == _labels(classifier_workdir)
  assert saved["model"]["num_classes"] == 4
  with pytest.raises(lmc.ConfigError, match="--format=hf: a classifier"):
    inference.export(str(classifier_workdir), str(tmp_path / "hf"), to="hf")


def _labels(workdir) -> str:
  return checkpoint.meta_config(inference.source_meta(str(workdir))).data.labels


def test_the_service_answers_as_decode_mode_does(classifier_workdir, tmp_path):
  lines = ["the big cat sees a dog", "some dogs help the queen today", "", "the fish sees an apple"]
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  command = [sys.executable, "-m", "experiments.run", "--mode=decode"]
  command += [f"--workdir={classifier_workdir}", f"--input={tmp_path}/in.txt", "--output=-"]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  decoded = out.stdout.splitlines()
  assert len(decoded) == 4 and decoded[2] == ""
  names = lmc.label_names(_labels(classifier_workdir))
  flags = ["--config=experiments/demo.py:classify_tiny", "--config.serve.max_batch=4"]
  with serve_process(f"--workdir={classifier_workdir}", *flags) as (_, url):
    answer = httpx.post(f"{url}/v1/classify", json={"text": [lines[i] for i in (0, 1, 3)]}).json()
    one = httpx.post(f"{url}/v1/classify", json={"text": lines[3]}).json()
    refusals = [
      httpx.post(f"{url}/v1/classify", json=body)
      for body in ({}, {"text": 3}, {"text": []}, {"text": "a", "beam_size": 2}, {"text": " "})
    ]
    info = httpx.get(f"{url}/v1/model").json()
    shown = page_output(url, lines[3], tmp_path / "profile") if chromium() else None
  assert info["task"] == "classify" and info["labels"] == names
  if shown is not None:  # the page: the label, then each class's probability
    assert shown.splitlines()[0] == one["results"][0]["label"]
    assert len(shown.splitlines()) == 1 + len(names)
  for line, result in zip([decoded[i] for i in (0, 1, 3)], answer["results"]):
    label, probabilities = line.split("\t")
    assert result["label"] == label and label in names
    np.testing.assert_allclose(
      [result["probabilities"][n] for n in names],
      [json.loads(probabilities)[n] for n in names],
      rtol=1e-5,
    )
  assert one["results"] == answer["results"][2:]
  assert [r.status_code for r in refusals] == [400] * 5
  assert [r.json()["error"]["field"] for r in refusals] == [
    "text",
    "text",
    "text",
    "beam_size",
    "text",
  ]


def test_init_from_an_imported_gpt2_trains_lora_and_the_head_on_its_decoder(tmp_path):
  from tests import hf_fixtures

  base = tmp_path / "gpt2"
  hf_fixtures.save_model("gpt2", base)
  rng = random.Random(1)
  rows = [synthetic.labelled_sentence(rng) for _ in range(120)]
  (tmp_path / "train.tsv").write_text("".join(f"{label}\t{text}\n" for text, label in rows))
  cfg = demo.get_config("classify_tiny")
  cfg.model.lora_rank = 4
  cfg.data.update(source=f"tsv:{tmp_path}/train.tsv", eval_examples=16)
  cfg.train.update(init_from=f"hf:{base}", total_steps=3)
  results = train.train(cfg, str(tmp_path / "run"))
  layout, tuned, _, _ = inference.restore_latest(str(tmp_path / "run"))
  _, imported, _, _ = inference.restore_model(f"hf:{base}", layout.cfg, "train.init_from")
  assert (layout.cfg.model.classifier_body, layout.cfg.model.pooling) == ("decoder", "last")
  assert layout.cfg.data.labels == "0,1,2,3"  # integer labels, in numeric order
  for path, x in zip(jax.tree.leaves(param_paths(imported)), jax.tree.leaves(imported)):
    if _at(tuned, path) is not None:  # the import's decoder and embedding: frozen under LoRA
      np.testing.assert_array_equal(np.asarray(_at(tuned, path)), np.asarray(x), err_msg=path)
  assert set(tuned) == set(imported) | {"head"}  # the import's stack, and a fresh head
  assert np.isfinite(results["eval_loss"])
