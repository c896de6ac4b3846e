"""The input pipeline: sources, tokenizer, packing, per-process shares, exact resume."""

import dataclasses
import itertools
import json
import os
import pickle
import tracemalloc

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import demo, lm1b, wmt_ende
from lm import config as lm_config
from lm import objective
from lm import train as lm_train
from lm.config import ConfigError
from lm.data import pipeline, sources, synthetic
from lm.data import tokenizer as tok
from lm.layout import batch_keys
from lm.train_step import Trainer
from tests.helpers import tiny_config

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS, size=n))


def _write_tsv(path, rows=300, seed=0):
  """Reversal pairs (learnable) plus one malformed line of each kind; returns the bad count."""
  rng = np.random.RandomState(seed)
  lines = []
  for _ in range(rows):
    words = _sentence(rng, rng.randint(2, 7))
    lines.append(f"{words}\t{' '.join(reversed(words.split()))}\n".encode())
  bad = [
    b"no tab on this line\n",
    b"empty target\t\n",
    b"\t empty source\n",
    b"two\ttabs\there\n",
    b"bad utf8 \xff\xfe\tbeta\n",
    b"\n",
  ]
  for i, line in enumerate(bad):
    lines.insert(7 + 31 * i, line)
  path.write_bytes(b"".join(lines))
  return len(bad)


def _data_config(task, source, **data):
  cfg = tiny_config(task)
  cfg.data.update(source=source, eval_examples=16, spm_model_type="word", prefetch=0)
  cfg.data.update(data)
  cfg.mesh.update(data=2, fsdp=-1)  # train() uses every device
  cfg.eval.update(bleu=False, examples=0)  # these tests assert losses, not translations
  return cfg


def _metrics(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_tsv_trains_translation_and_counts_malformed_lines(tmp_path):
  path = tmp_path / "pairs.tsv"
  bad = _write_tsv(path)
  cfg = _data_config("translation", f"tsv:{path}")
  cfg.train.update(total_steps=40, log_every=10, global_batch_size=16)
  results = lm_train.train(cfg, str(tmp_path / "run"))
  lines = [m for m in _metrics(tmp_path / "run") if "loss" in m]
  assert all(m["skipped_examples"] == bad for m in lines)
  assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]
  assert np.isfinite(results["eval_loss"])


def test_text_file_trains_an_lm(tmp_path):
  rng = np.random.RandomState(1)
  path = tmp_path / "docs.txt"
  # Each document counts up through the words: predictable after its first word.
  docs = [" ".join(WORDS[s : s + rng.randint(3, 8)]) for s in rng.randint(0, 5, size=200)]
  path.write_text("\n".join(docs) + "\n\n")  # a trailing empty line: skipped
  cfg = _data_config("lm", f"text:{tmp_path}/*.txt")
  cfg.train.update(total_steps=30, log_every=10, global_batch_size=16)
  lm_train.train(cfg, str(tmp_path / "run"))
  lines = [m for m in _metrics(tmp_path / "run") if "loss" in m]
  assert lines[-1]["skipped_examples"] == 1
  assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]


def test_jsonl_records_and_errors(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"de": "hallo welt", "en": "hello world"}\n{"de": "x"}\nnot json\n')
  cfg = _data_config("translation", f"jsonl:{path}", direction="en->de")
  source = sources.open_source(cfg.data.source, cfg.data, cfg.task, 0)
  assert len(source) == 1 and source.skipped == 2
  assert source[0] == {"inputs": "hello world", "targets": "hallo welt"}
  cfg.data.fields = "de"
  with pytest.raises(ConfigError, match="config.data.fields"):
    sources.open_source(cfg.data.source, cfg.data, cfg.task, 0)


def _parsed_lines(kind, task, keys, paths):
  """The records of the lines _parse_line accepts, one line at a time, and how many it rejects:
  what LineFileSource must index, found the slow way."""
  records, rejected = [], 0
  for path in paths:
    with open(path, "rb") as f:
      for line in f:
        record = sources._parse_line(kind, task, keys, line)
        records += [record] if record else []
        rejected += not record
  return records, rejected


@pytest.mark.parametrize("block", [3, 64, 1 << 20])
def test_line_index_keeps_exactly_the_lines_that_parse(tmp_path, monkeypatch, block):
  """The array scan agrees with parsing line by line on lines cut by its blocks, a last line
  without a newline, an empty file, Unicode whitespace, control bytes and invalid UTF-8."""
  monkeypatch.setattr(sources, "SCAN_BYTES", block, raising=False)  # (none before: one loop)
  texts = [b"a", b"b c", b" ", b"\r", b"\x0b", b"\x1c", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80"]
  texts += [t.encode() for t in ("\u00e4", "\u00a0", "\u0085", "\u2003", "\u3000", "\u3042")]
  objects = [b'{"t": "x"}', b'{"t": " \\u00a0"}', b'{"t": "\xe3\x80\x80y"}', b'{"u": "x"}', b"[1]"]
  rng = np.random.RandomState(0)

  def line():
    if rng.rand() < 0.2:
      return objects[rng.randint(len(objects))] + b"\n"
    sides = [b"".join(texts[j] for j in rng.randint(len(texts), size=rng.randint(4))) for _ in "ab"]
    return sides[0] + b"\t" * rng.choice([0, 1, 1, 2]) + sides[1] + b"\r\n" * rng.randint(2) + b"\n"

  paths = [tmp_path / f"part{i}.txt" for i in range(4)]
  for i, path in enumerate(paths):  # part0 is empty; part2 ends without a newline
    path.write_bytes(b"".join(line() for _ in range(100 * i))[: -1 if i == 2 else None])
  for kind, task, keys in [("tsv", "translation", ()), ("text", "lm", ()), ("jsonl", "lm", ("t",))]:
    records, rejected = _parsed_lines(kind, task, keys, paths)
    source = sources.LineFileSource(kind, f"{tmp_path}/part*.txt", task, keys)
    assert [source[i] for i in range(len(source))] == records and source.skipped == rejected
    assert len(records) > 20 and rejected > 20


def test_line_index_takes_arrays_far_smaller_than_the_file(tmp_path):
  """Indexing a 50 MB file allocates (Python objects and numpy buffers alike) under a third of
  its size: the index is 12 bytes a line in two arrays, the rest a few scan blocks."""
  rng = np.random.RandomState(0)
  block = "".join(f"{_sentence(rng, 8)}\t{_sentence(rng, 8)}\n" for _ in range(5000)).encode()
  path = tmp_path / "big.tsv"
  with open(path, "wb") as f:
    for _ in range(50_000_000 // len(block)):
      f.write(block)
  size = path.stat().st_size
  tracemalloc.start()
  try:
    source = sources.LineFileSource("tsv", str(path), "translation", ())
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert len(source) == 5000 * (50_000_000 // len(block))
  assert source.offsets.nbytes + source.lengths.nbytes == 12 * len(source)
  assert peak < size / 3, f"indexing took {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


def _open_on(paths) -> int:
  """How many of this process's file descriptors are open on one of `paths`."""
  targets = []
  for fd in os.listdir("/proc/self/fd"):
    try:
      targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the listing's own descriptor, closed by now
      pass
  return sum(target in set(map(str, paths)) for target in targets)


def test_line_files_open_when_read_and_close_on_close(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "MAX_OPEN_FILES", 2, raising=False)
  paths = [tmp_path / f"part{i}.txt" for i in range(3)]
  for i, path in enumerate(paths):
    path.write_text(f"doc {i}a\ndoc {i}b\n")
  source = sources.LineFileSource("text", f"{tmp_path}/part*.txt", "lm", ())
  assert _open_on(paths) == 0  # the scan closed every file
  docs = [source[i]["targets"] for i in range(6)]
  assert docs == ["doc 0a", "doc 0b", "doc 1a", "doc 1b", "doc 2a", "doc 2b"]
  assert _open_on(paths) == 2  # at most MAX_OPEN_FILES: the least recently read one closed
  copy = pickle.loads(pickle.dumps(source))  # as a grain worker gets it: opens its own
  assert copy[0] == {"targets": "doc 0a"} and _open_on(paths) == 3
  source.close()
  assert _open_on(paths) == 1
  copy.close()
  assert _open_on(paths) == 0
  with source:
    assert source[-1] == {"targets": "doc 2b"} and _open_on(paths) == 1
  assert _open_on(paths) == 0


def test_pipeline_closes_the_files_it_is_done_with(tmp_path):
  train, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
  train.write_text("".join(f"w{i} w{i + 1}\n" for i in range(100)))
  held_out.write_text("w1 w2\nw3 w4\n")
  cfg = _data_config("lm", f"text:{train}", eval_source=f"text:{held_out}")
  data = pipeline.load(cfg, str(tmp_path / "run"))
  assert len(data.eval_records) == 2 and _open_on([held_out]) == 0  # read, then closed
  assert _open_on([train]) == 1  # read for the tokenizer; the iterator reads it next
  data.close()
  assert _open_on([train]) == 0


@pytest.mark.parametrize(
  "source,message",
  [
    ("tsv:/nonexistent/*.tsv", "no file matches '/nonexistent/\\*.tsv'"),
    ("parquet:x", "unknown kind 'parquet'"),
    ("tsv", "must read KIND:ARG"),
    ("text:{tmp}/empty.txt", "has no usable example"),
    ("tfds:wmt14_translate/de-en:train", "tfds build wmt14_translate/de-en"),
  ],
)
def test_bad_sources_fail_in_one_line(tmp_path, source, message):
  (tmp_path / "empty.txt").write_text("\n\n")
  cfg = _data_config("translation", source.format(tmp=tmp_path), direction="en->de")
  cfg.task = "lm" if source.startswith("text") else "translation"
  cfg.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(ConfigError, match=message) as error:
    pipeline.load(cfg, str(tmp_path / "run"))
  assert "\n" not in str(error.value) and str(error.value).startswith("config.data.")


@pytest.mark.parametrize("module,variant", [(wmt_ende, "base"), (lm1b, "base")])
def test_tfds_mock_data_feeds_the_real_configs(tmp_path, module, variant):
  cfg = module.get_config(variant)
  cfg.model.update(tiny_config(cfg.task).model)
  cfg.model.update(vocab_size=128)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.data.update(seq_len=16, eval_examples=8, tokenizer_sample=64, workers=0)
  cfg.train.update(total_steps=3, log_every=1, global_batch_size=8)
  cfg.eval.update(every=0, bleu=False, examples=0)
  with tfds.testing.mock_data(num_examples=64):
    results = lm_train.train(cfg, str(tmp_path))
  lines = [m for m in _metrics(tmp_path) if "loss" in m]
  assert [m["step"] for m in lines] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and m["tokens_per_second"] > 0 for m in lines)
  assert np.isfinite(results["eval_loss"]) and (tmp_path / "tokenizer.model").exists()


def _demo_data(tmp_path, **data):
  cfg = tiny_config("translation")
  cfg.data.update(
    source="synthetic:demo", spm_model_type="word", tokenizer_sample=2000, eval_examples=8
  )
  cfg.data.update(data)
  return cfg, pipeline.load(cfg, str(tmp_path))


def test_packing_keeps_every_token_and_the_loss_of_the_unpacked_examples(tmp_path):
  cfg, data = _demo_data(tmp_path, seq_len=24, prefetch=0)
  batch = next(pipeline.TrainIterator(data))
  assert set(batch) == set(batch_keys("translation", packed=True))
  examples = []
  for side in ("inputs", "targets"):
    seg, pos, ids = (batch[side + s] for s in ("_segment_ids", "_positions", ""))
    assert ((ids > 0) == (seg > 0)).all()
    for row in range(len(ids)):
      for s in range(1, seg[row].max() + 1):
        where = np.flatnonzero(seg[row] == s)
        assert (where == np.arange(where[0], where[0] + len(where))).all()  # contiguous
        np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))
        assert ids[row, where[-1]] == tok.EOS_ID  # every segment ends whole
  # The unpacked examples, in order: segment s of row r on each side.
  for row in range(len(batch["targets"])):
    for s in range(1, batch["targets_segment_ids"][row].max() + 1):
      examples.append(
        {
          side: batch[side][row][batch[side + "_segment_ids"][row] == s]
          for side in ("inputs", "targets")
        }
      )
  assert len(examples) > len(batch["targets"])  # several examples per row
  tokens = sum((e["targets"] > 0).sum() for e in examples)
  assert tokens == (batch["targets"] > 0).sum()

  run = Trainer.build(cfg, devices=jax.devices()[:1], tokenizer_size=data.tokenizer.vocab_size)
  params = run.init_state().params
  loss_sums = jax.jit(lambda b: objective.training_loss_sums(run.layout, params, b, None))
  with jax.set_mesh(run.layout.mesh):
    packed_loss, (packed_tokens, _) = loss_sums(run.layout.shard_batch(batch))
    rows = {}
    for k in ("inputs", "targets"):
      rows[k] = np.stack([np.pad(e[k], (0, cfg.data.seq_len - len(e[k]))) for e in examples])
      lengths = np.asarray([len(e[k]) for e in examples])
      rows[k + "_segment_ids"] = (np.arange(cfg.data.seq_len) < lengths[:, None]).astype(np.int32)
    total = loss_sums(rows)[0]
  np.testing.assert_allclose(float(packed_loss), total, rtol=2e-5)
  assert float(packed_tokens) == tokens


def _assert_resumes_exactly(data, skip: int, count: int) -> list[dict]:
  """A fresh iterator given the state saved after `skip` batches yields the next `count` batches
  of the uninterrupted one; returns them."""
  uninterrupted = pipeline.TrainIterator(data)
  for _ in range(skip):
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # what a checkpoint stores
  expected = [next(uninterrupted) for _ in range(count)]
  resumed = pipeline.TrainIterator(data)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  return expected


def test_long_documents_split_into_pieces_lose_no_token(tmp_path):
  lengths = [3, 7, 8, 20, 31]  # words; + EOS: 1, 1, 2, 3 and 4 pieces of 8
  docs = [" ".join(f"w{i}" for i in range(start, start + n)) for start, n in enumerate(lengths)]
  path = tmp_path / "docs.txt"
  path.write_text("\n".join(docs) + "\n")
  cfg = _data_config("lm", f"text:{path}", seq_len=8, too_long="split", pack=False)
  cfg.data.eval_source = f"text:{path}"  # keep every document for training
  cfg.train.global_batch_size = 1
  cfg.model.vocab_size = 64  # a piece per word
  data = pipeline.load(cfg, str(tmp_path / "run"))
  pieces = sum(-(-(n + 1) // 8) for n in lengths)
  it = pipeline.TrainIterator(data)
  rows = [next(it)["targets"][0] for _ in range(pieces)]  # one epoch, a piece per row
  stream = np.concatenate([r[r > 0] for r in rows])
  ends = np.flatnonzero(stream == tok.EOS_ID)
  got = sorted(data.tokenizer.decode(d) for d in np.split(stream, ends + 1)[:-1])
  assert got == sorted(docs)  # pieces of a document stay in order, nothing cut
  assert sum(len(r[r > 0]) == 8 for r in rows) == sum((n + 1) // 8 for n in lengths)

  cfg.data.pack = True
  for batch in _assert_resumes_exactly(data, skip=3, count=3):
    pos, seg = batch["targets_positions"][0], batch["targets_segment_ids"][0]
    for s in range(1, seg.max() + 1):  # every piece starts at position 0
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))

  cfg.task = "translation"
  with pytest.raises(ConfigError, match="data.too_long"):
    lm_config.validate(cfg)


def _line_ids(batch):
  return [int(row[0]) for row in batch["targets"]]


def _global_batches(data, processes: int, count: int, state=None):
  """`count` global batches as `processes` processes build them (rows concatenated in process
  order), and the state each process would save after them."""
  iterators = [
    pipeline.TrainIterator(data, process_index=p, process_count=processes) for p in range(processes)
  ]
  if state is not None:
    for it in iterators:
      it.set_state(state)
  batches = [[next(it) for it in iterators] for _ in range(count)]
  joined = [{k: np.concatenate([part[k] for part in parts]) for k in parts[0]} for parts in batches]
  return joined, [json.loads(json.dumps(it.get_state())) for it in iterators]


@pytest.mark.parametrize("pack", [False, True])
def test_global_batches_and_resume_do_not_depend_on_the_process_count(tmp_path, pack):
  path = tmp_path / "docs.txt"
  path.write_text("".join(f"w{i}\n" for i in range(101)))
  cfg = _data_config("lm", f"text:{path}", pack=pack, spm_model_type="word", seq_len=8)
  cfg.data.eval_source = f"text:{path}"  # keep all 101 lines for training
  cfg.train.global_batch_size = 4
  cfg.model.vocab_size = 128  # a piece per line
  data = pipeline.load(cfg, str(tmp_path / "run"))
  reference, _ = _global_batches(data, 1, 45)
  if not pack:  # one line per row: the first 25 batches are one epoch, each line once
    lines = [data.tokenizer.decode(r) for b in reference[:25] for r in b["targets"]]
    assert len(set(lines)) == 100
  for processes in (2, 4):
    batches, states = _global_batches(data, processes, 40)
    for got, want in zip(batches, reference[:40], strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  # Saved by 2 processes after 15 batches, resumed by 1 and by 4; saved by 4, resumed by 2.
  _, states = _global_batches(data, 2, 15)
  merged = pipeline.merge_states(states, own=None)
  for processes in (1, 4):
    resumed, states4 = _global_batches(data, processes, 25, state=merged)
    for got, want in zip(resumed, reference[15:40], strict=True):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  resumed, _ = _global_batches(data, 2, 5, state=pipeline.merge_states(states4, own=None))
  for got, want in zip(resumed, reference[15 + 25 :], strict=True):
    np.testing.assert_array_equal(got["targets"], want["targets"])


class _CountingSource:
  """A random-access source that records which examples were read."""

  def __init__(self, records):
    self.records, self.read = records, []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    self.read.append(index)
    return self.records[index]


def test_each_process_reads_only_its_lanes_examples(tmp_path):
  """4 processes building 24 global batches of 8 rows read 48 examples each (192 in all, as
  one process reads): each reads its quarter of the order, none reads another's."""
  path = tmp_path / "docs.txt"
  path.write_text("".join(f"w{i}\n" for i in range(500)))
  # (_data_config: no prefetch, so nothing is read ahead and the counts are exact)
  cfg = _data_config("lm", f"text:{path}", pack=False, spm_model_type="word", seq_len=8)
  cfg.train.global_batch_size = 8
  cfg.model.vocab_size = 128
  data = pipeline.load(cfg, str(tmp_path / "run"))
  records = [data.train[i] for i in range(len(data.train))]
  reads = []
  for p in range(4):
    source = _CountingSource(records)
    counted = dataclasses.replace(data, train=grain.MapDataset.source(source))
    iterator = pipeline.TrainIterator(counted, process_index=p, process_count=4)
    for _ in range(24):
      next(iterator)
    reads.append(source.read)
  assert [len(r) for r in reads] == [48] * 4
  assert len(set().union(*map(set, reads))) == 192  # disjoint shares of one epoch's order


@pytest.mark.parametrize("prefetch,workers", [(0, 0), (3, 0), (0, 2)])
def test_iterator_state_resumes_exactly(tmp_path, prefetch, workers):
  _, data = _demo_data(tmp_path, prefetch=prefetch, workers=workers)
  _assert_resumes_exactly(data, skip=5, count=4)


def _with_long_pairs(tmp_path, pairs: int, long: int, **data):
  """A config whose tsv has `pairs` short pairs, the malformed lines of _write_tsv, then `long`
  pairs of 21 tokens that data.too_long=drop skips at seq_len 16; all of them train."""
  path = tmp_path / "pairs.tsv"
  bad = _write_tsv(path, rows=pairs)
  rng = np.random.RandomState(1)
  with open(path, "a") as f:
    f.write("".join(f"{_sentence(rng, 20)}\t{_sentence(rng, 3)}\n" for _ in range(long)))
  cfg = _data_config("translation", f"tsv:{path}", too_long="drop", eval_source=f"tsv:{path}")
  cfg.data.update(data)
  cfg.train.global_batch_size = 4
  return cfg, bad


def _skips_before_rows(dropped: set, order, lanes: int, workers: int, batches: int) -> int:
  """Examples dropped to build `batches` unpacked batches: lane l takes order[l::lanes], a row
  its next kept example; with data workers, worker w takes every workers-th example of a lane
  from its w-th on and builds batches w, w + workers, ... (grain's mp_prefetch)."""
  total = 0
  for lane, worker in itertools.product(range(lanes), range(workers)):
    rows, i = len(range(worker, batches, workers)), lane + worker * lanes
    while rows:
      total += order[i] in dropped
      rows -= order[i] not in dropped
      i += lanes * workers
  return total


def test_skipped_examples_count_exactly_with_data_workers(tmp_path):
  """Malformed lines count at load; examples dropped while building rows (here too long) count
  with the rows, also when grain's worker processes build them."""
  pairs, long, batches = 120, 24, 80  # 320 rows: two epochs and a bit of the 144 examples
  cfg, bad = _with_long_pairs(tmp_path, pairs, long, pack=False)
  order = grain.MapDataset.range(pairs + long).shuffle(seed=cfg.seed).repeat()
  counts, iterators = {}, []
  for workers in (0, 2):
    cfg.data.workers = workers
    data = pipeline.load(cfg, str(tmp_path / "run"))
    iterators.append(pipeline.TrainIterator(data))
    for _ in range(batches):
      next(iterators[-1])
    counts[workers] = data.skipped_at_load + iterators[-1].skipped
  dropped = set(range(pairs, pairs + long))
  want = {w: bad + _skips_before_rows(dropped, order, 4, max(w, 1), batches) for w in counts}
  assert counts == want and min(want.values()) > bad + long
  for iterator in iterators:
    iterator.close()


def test_skipped_count_resumes_exactly_with_packing_and_prefetch(tmp_path):
  """A resumed iterator counts the skips of the batches it yields once: the rows a packing
  round had already given are packed again but not counted again, nor is read-ahead."""
  cfg, _ = _with_long_pairs(tmp_path, 120, 24, prefetch=3)
  data = pipeline.load(cfg, str(tmp_path / "run"))
  uninterrupted = pipeline.TrainIterator(data)
  for _ in range(6):
    next(uninterrupted)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  for _ in range(6):
    next(uninterrupted)
  resumed = pipeline.TrainIterator(data)
  resumed.set_state(state)
  for _ in range(6):
    next(resumed)
  assert resumed.skipped == uninterrupted.skipped > 0
  resumed.close()
  uninterrupted.close()


def test_tokenizer_round_trips_and_is_cached(tmp_path):
  texts = ["Hello, world!", "Grüße aus Köln — 2026.", "a b c"] * 50
  data_cfg = tiny_config().data
  data_cfg.spm_model_type = "unigram"
  first = tok.load_or_train(data_cfg, 64, str(tmp_path), lambda: iter(texts))
  for text in set(texts):
    ids = first.encode(text)
    assert tok.UNK_ID not in ids and min(ids) > tok.EOS_ID
    assert first.decode(ids + [tok.EOS_ID, 7, 8]) == text  # stops at EOS
    assert first.decode([tok.PAD_ID] + ids) == text

  def must_not_train():
    raise AssertionError("retrained a cached tokenizer")

  messages = []
  second = tok.load_or_train(data_cfg, 64, str(tmp_path), must_not_train, messages.append)
  assert second.model_proto == first.model_proto and "reusing" in messages[0]


def test_demo_source_inflects_english_correctly():
  assert [synthetic.third_person(v) for v in ("watch", "carry", "see", "play")] == [
    "watches",
    "carries",
    "sees",
    "plays",
  ]
  assert [synthetic.plural(n) for n in ("city", "child", "box", "boy", "fish")] == [
    "cities",
    "children",
    "boxes",
    "boys",
    "fish",
  ]
  words = {w for i in range(2000) for w in synthetic.DemoSource(2000, 0)[i][0].split()}
  assert {"watches", "carries", "cities", "children"} <= words
  assert not words & {"watchs", "carrys", "citys", "childs", "womans", "mans", "fishs"}


def test_demo_english_feeds_an_lm_the_pairs_english_side_only(tmp_path):
  cfg = demo.get_config("lm_tiny")
  cfg.data.update(tokenizer_sample=2000, eval_examples=16, prefetch=0)
  lm_config.validate(cfg)
  data = pipeline.load(cfg, str(tmp_path))
  pairs = synthetic.DemoSource(sources.SYNTHETIC_DEMO_SIZE, cfg.seed)
  assert data.eval_records == [{"targets": pairs[i][0]} for i in range(16)]
  batch = next(pipeline.TrainIterator(data))
  assert set(batch) == set(batch_keys("lm", packed=True))
  english = {w for i in range(2000) for w in pairs[i][0].split()}
  foreign = {w for i in range(2000) for w in pairs[i][1].split()}
  ids = batch["targets"][batch["targets_segment_ids"] > 0]
  words = {data.tokenizer.decode([int(i)]) for i in ids if i != data.tokenizer.eos_id}
  assert words <= english and not words & foreign, words - english
  assert len(words) > 30
  data.close()


@pytest.mark.parametrize(
  "name,task,message",
  [
    ("demo_english", "translation", "is for task 'lm', not 'translation'"),
    ("demo", "lm", "use 'synthetic:demo_english'"),
    (
      "demo_englsh",
      "lm",
      "unknown; choose 'synthetic:demo' \\(translation\\), .*'synthetic:demo_english' \\(lm\\)",
    ),
  ],
)
def test_synthetic_sources_refuse_the_wrong_task_and_unknown_names(name, task, message):
  with pytest.raises(ConfigError, match=message):
    sources.SyntheticSource(name, task, seed=0)
