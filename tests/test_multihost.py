"""Several processes through jax.distributed on this machine (4 CPU devices each), against one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import checkpoint
from tests import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(command: list[str], processes: int, logdir) -> subprocess.Popen:
  """Starts `command` as the processes of one job through launch/local.sh."""
  env = dict(os.environ, LOGDIR=str(logdir), DEVICES="4")
  script = os.path.join(ROOT, "launch", "local.sh")
  return subprocess.Popen(["bash", script, str(processes), *command], cwd=ROOT, env=env)


def _finish(job: subprocess.Popen, processes: int, logdir) -> list[str]:
  """Waits for the job; the processes' outputs."""
  try:
    returncode = job.wait(timeout=300)
  except subprocess.TimeoutExpired:  # e.g. processes that disagree wait on each other forever
    for pid_file in logdir.glob("process_*.pid"):
      with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    job.kill()
    raise
  outputs = [(logdir / f"process_{i}.log").read_text() for i in range(processes)]
  assert returncode == 0, "\n".join(out[-2000:] for out in outputs)
  return outputs


def test_two_slices_train_and_decode_like_one_process(tmp_path):
  """2 processes as 2 slices (mesh.dcn_data=2, data across them) against 1 process: every ZeRO
  stage of the 2-slice run gives the 1-process ZeRO-3 losses (tests/test_parallel.py holds
  every stage on one process to one device)."""
  output = tmp_path / "two.json"
  worker = [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py")]
  _finish(_start([*worker, f"--output={output}"], 2, tmp_path), 2, tmp_path)
  two = json.loads(output.read_text())
  one = multihost_worker.run_and_decode(stages=(3,))  # this process: 8 devices
  assert two["process_count"] == 2 and one["process_count"] == 1
  # The gradient shards are summed over data, and data runs across the two processes.
  assert two["data_axis_processes"] == 2 and two["data_reduction_bytes"] > 0
  assert two["data_reduction_bytes"] == one["data_reduction_bytes"]
  assert sorted(two["losses"]) == ["0", "1", "2", "3"]
  for losses in two["losses"].values():
    np.testing.assert_allclose(losses, one["losses"]["3"], rtol=1e-5)
  np.testing.assert_allclose(two["norms"], one["norms"], rtol=1e-5)
  assert two["decodes"] == one["decodes"]


@pytest.fixture(scope="module")
def two_process_workdir(tmp_path_factory):
  """The demo trained by 2 processes until process 1 alone gets SIGTERM, then resumed by 2
  processes to step 10."""
  workdir = tmp_path_factory.mktemp("multihost")
  command = [
    sys.executable,
    "-m",
    "experiments.run",
    "--config=experiments/demo.py:tiny",
    f"--workdir={workdir}",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.zero_stage=3",
    "--config.train.total_steps=10",
    "--config.train.log_every=1",
    "--config.data.eval_examples=16",
  ]
  logs = [tmp_path_factory.mktemp("logs") for _ in range(2)]
  first = _start(command, 2, logs[0])
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
    assert first.poll() is None and time.time() < deadline, "no step 3 logged"
    time.sleep(0.2)
  os.kill(int((logs[0] / "process_1.pid").read_text()), signal.SIGTERM)
  first_outputs = _finish(first, 2, logs[0])
  second_outputs = _finish(_start(command, 2, logs[1]), 2, logs[1])
  return workdir, first_outputs, second_outputs


def test_a_signal_to_one_process_stops_all_at_one_step_and_they_resume(two_process_workdir):
  workdir, first, second = two_process_workdir
  stopped = re.search(r"SIGTERM: stopped after step (\d+)", first[0])
  assert stopped, first[0][-2000:]
  step = int(stopped.group(1))
  assert f"resumed from step {step}" in second[0]
  assert "resumed" not in second[1], "only process 0 logs"
  data = workdir / "checkpoints" / str(step) / "data"
  shares = sorted(p.name for p in data.iterdir() if p.name.startswith("process_"))
  assert shares == ["process_0-of-2.json", "process_1-of-2.json"]
  with open(workdir / "metrics.jsonl") as f:
    steps = [m["step"] for m in map(json.loads, f) if "loss" in m]
  assert steps == list(range(1, 11))  # every step once, written by process 0 only


def test_one_process_evaluates_what_two_processes_trained_alike(two_process_workdir):
  """Eval loss (each process its share of the padded eval rows) and BLEU (every process decodes
  the same rows) of the 2-process run equal a 1-process --mode=eval of its checkpoint."""
  workdir, _, _ = two_process_workdir
  result = subprocess.run(
    [sys.executable, "-m", "experiments.run", "--mode=eval", f"--workdir={workdir}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  alone = json.loads((workdir / "eval.json").read_text())
  with open(workdir / "metrics.jsonl") as f:
    together = [m for m in map(json.loads, f) if "eval_loss" in m][-1]
  assert alone["step"] == together["step"] == 10
  np.testing.assert_allclose(alone["eval_loss"], together["eval_loss"], rtol=1e-5)
  np.testing.assert_allclose(alone["eval_accuracy"], together["eval_accuracy"], rtol=1e-6)
  assert alone["bleu"] == pytest.approx(together["bleu"], abs=1e-6)


def test_a_lost_process_ends_the_job_within_the_heartbeat_timeout(tmp_path):
  command = [
    sys.executable,
    "-m",
    "experiments.run",
    "--config=experiments/demo.py:tiny",
    f"--workdir={tmp_path / 'run'}",
    "--config.mesh.data=2",
    "--config.train.total_steps=100000",
    "--config.train.log_every=1",
    "--config.checkpoint.every=2",
    "--heartbeat_timeout=10",
  ]
  job = _start(command, 2, tmp_path)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
    assert job.poll() is None and time.time() < deadline, "no step 3 logged"
    time.sleep(0.2)
  os.kill(int((tmp_path / "process_1.pid").read_text()), signal.SIGKILL)
  killed = time.time()
  survivor = int((tmp_path / "process_0.pid").read_text())
  while time.time() - killed < 120:
    try:
      os.kill(survivor, 0)
    except ProcessLookupError:
      break
    time.sleep(0.5)
  else:
    os.kill(survivor, signal.SIGKILL)
    pytest.fail("process 0 still runs 120 s after process 1 was killed")
  elapsed = time.time() - killed
  assert job.wait(timeout=30) != 0
  assert elapsed < 60, elapsed  # the 10 s heartbeat timeout plus detection and shutdown
  # Either the coordination service ends process 0, naming the silent task, or a collective with
  # the dead peer fails first and the runner says so in one line.
  log = (tmp_path / "process_0.log").read_text()
  named = re.search(r"stopped sending heartbeats\):\s*1\b|Task 1 heartbeat timeout", log)
  assert named or "\nerror: a collective failed" in log, log[-3000:]
  run, params, _, step = checkpoint.restore_latest(str(tmp_path / "run"))
  assert step >= 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
