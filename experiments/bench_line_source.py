"""Peak memory and start-up time of processes reading a large TSV through the real pipeline.

  python -m experiments.bench_line_source --size_gb=1 --processes=1,4 --before=/tmp/before

Writes a TSV of --size_gb (source<TAB>target, ~115-byte lines, 1 in 1000 malformed) and a word
tokenizer under a temporary directory, deleted at the end. For each checkout (--before, e.g.
`git archive <commit> | tar -x -C /tmp/before`, then this one) and each process count P, starts
P OS processes at once; process i runs `pipeline.load` (which indexes the file) and takes the
first batch of `TrainIterator(data, process_index=i, process_count=P)`. Each reports its peak
RSS (ru_maxrss), start-up seconds (load + first batch, imports excluded) and bytes read
(/proc/self/io rchar: the index scan reads the whole file in every process).
Measured (one run, 2 CPU cores shared with other jobs; 1.01 GiB, 9.43M pairs + 9440 malformed,
in the page cache; before = 4076d1b, after = 0765ba6; per process, mean of the P; imports alone
take 221 MB; every process reads the file once, 1057 MB, to index it):
               peak RSS MB   start-up s
  before, P=1      847          26.8
  before, P=4      848         111.5
  after,  P=1      331           6.0
  after,  P=4      331          18.4
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_SIZE_GB = flags.DEFINE_float("size_gb", 1.0, "Size of the generated TSV.")
_PROCESSES = flags.DEFINE_string("processes", "1,4", "Process counts to run, comma-separated.")
_BEFORE = flags.DEFINE_string("before", "", "Another checkout to measure first, e.g. old code.")
_BATCH = 64  # global batch: 64 rows, 16 a process with 4

# Run in each process, in the checkout under test (its directory first on sys.path).
_CHILD = """
import json, resource, sys, time
from lm import config as lmc
from lm.data import pipeline
path, tokenizer, workdir, index, count, batch = sys.argv[1:]
imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cfg = lmc.translation_defaults()
cfg.data.update(source="tsv:" + path, tokenizer=tokenizer, prefetch=0, workers=0)
cfg.train.global_batch_size = int(batch)
start = time.perf_counter()
data = pipeline.load(cfg, workdir, log=lambda message: None)
loaded = time.perf_counter()
iterator = pipeline.TrainIterator(data, process_index=int(index), process_count=int(count))
rows = len(next(iterator)["targets"])
first = time.perf_counter()
rchar = int(dict(line.split(": ") for line in open("/proc/self/io"))["rchar"])
print(json.dumps(dict(
  examples=len(data.train), skipped=data.skipped_at_load, rows=rows, load_s=loaded - start,
  startup_s=first - start, imports_mb=imports_mb, read_mb=rchar / 2**20,
  rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
)))
"""


def write_tsv(path: str, size: int, seed: int = 0) -> int:
  """~100-byte lines of random words, 1 in 1000 without a tab; written as 8 MB blocks of bytes,
  each a fresh shuffle of one pool of lines. Returns the bytes written."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  vocab = [bytes(rng.choice(letters, size=n)) for n in rng.integers(2, 9, size=4000)]
  words = rng.choice(len(vocab), size=(80_000, 2, 16))
  counts = rng.integers(4, 16, size=(80_000, 2))
  pool = np.array(
    [
      b" ".join(vocab[w] for w in words[i, 0, : counts[i, 0]])
      + (b" " if i % 1000 == 999 else b"\t")  # a malformed line: no tab
      + b" ".join(vocab[w] for w in words[i, 1, : counts[i, 1]])
      + b"\n"
      for i in range(len(words))
    ],
    dtype=object,
  )
  written = 0
  with open(path, "wb") as f:
    while written < size:
      block = b"".join(rng.permutation(pool))
      f.write(block)
      written += len(block)
  return written


def measure(code: str, path: str, tokenizer: str, workdir: str, processes: int) -> list[dict]:
  """Starts `processes` processes at once on checkout `code`; each one's report."""
  env = {**os.environ, "PYTHONPATH": code, "JAX_PLATFORMS": "cpu"}
  children = [
    subprocess.Popen(
      [sys.executable, "-c", _CHILD, path, tokenizer, workdir, str(i), str(processes), str(_BATCH)],
      cwd=code,
      env=env,
      stdout=subprocess.PIPE,
    )
    for i in range(processes)
  ]
  reports = []
  for child in children:
    out, _ = child.communicate()
    if child.returncode:
      raise RuntimeError(f"a measured process on {code} failed ({child.returncode})")
    reports.append(json.loads(out.decode().strip().splitlines()[-1]))
  return reports


def main(argv):
  del argv
  from lm.data import tokenizer as tok

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  checkouts = ([("before", _BEFORE.value)] if _BEFORE.value else []) + [("after", here)]
  tmp = tempfile.mkdtemp(prefix="bench_line_source_")
  try:
    path = os.path.join(tmp, "pairs.tsv")
    started = time.perf_counter()
    size = write_tsv(path, int(_SIZE_GB.value * 2**30))
    print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - started:.1f}s -> {path}")
    with open(path, "rb") as f:  # the tokenizer's sample: the first lines, both sides
      sample = [side for line in f.readlines(8 << 20) for side in line.decode().split("\t")]
    tok.save(tok.train(sample, 4096, "word"), tmp)
    tokenizer = os.path.join(tmp, tok.TOKENIZER_FILE)
    print("code    procs  RSS MB (mean/max)  start-up s (mean/max)  read MB/proc  examples")
    for name, code in checkouts:
      for processes in map(int, _PROCESSES.value.split(",")):
        reports = measure(code, path, tokenizer, tmp, processes)
        rss = [r["rss_mb"] for r in reports]
        startup = [r["startup_s"] for r in reports]
        print(
          f"{name:7} {processes:5}  {np.mean(rss):7.0f} / {max(rss):6.0f}"
          f"     {np.mean(startup):8.1f} / {max(startup):6.1f}"
          f"     {np.mean([r['read_mb'] for r in reports]):10.0f}  {reports[0]['examples']}"
          f" (+{reports[0]['skipped']} skipped)",
          flush=True,
        )
        print("        " + json.dumps(reports), flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
