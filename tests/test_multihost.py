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

from lm import evaluate, inference
from lm.decode import Decoder
from tests import multihost_worker
from tests.helpers import cluster_flags, damage_largest_array_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(command: list[str], processes: int, logdir, devices: int = 4) -> subprocess.Popen:
  """Starts `command` as the processes of one job through launch/local.sh."""
  # LLVM at -O0, as in the test process: these tiny runs spend their time compiling.
  env = dict(
    os.environ,
    LOGDIR=str(logdir),
    DEVICES=str(devices),
    XLA_FLAGS="--xla_backend_optimization_level=0",
  )
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


def test_two_slices_train_and_decode_like_one_device(tmp_path):
  """2 processes as 2 slices (mesh.dcn_data=2, data across them, fsdp and tensor within each)
  give one device's losses under every ZeRO stage, and each stage's compiled step reduces
  gradients over a data axis that spans both processes."""
  output = tmp_path / "two.json"
  worker = [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py")]
  _finish(_start([*worker, f"--output={output}"], 2, tmp_path), 2, tmp_path)
  two = json.loads(output.read_text())
  one = multihost_worker.run_and_decode(stages=(0,), one_device=True)
  assert two["process_count"] == 2 and one["process_count"] == 1
  assert two["data_axis_processes"] == 2
  assert sorted(two["losses"]) == ["0", "1", "2", "3"]
  for stage, losses in two["losses"].items():
    print(
      f"stage {stage}: losses {losses}, data-axis reduction {two['data_reduction_bytes'][stage]} B"
    )
    assert two["data_reduction_bytes"][stage] > 0, stage
    np.testing.assert_allclose(losses, one["losses"]["0"], rtol=1e-5, err_msg=f"stage {stage}")
  np.testing.assert_allclose(two["norms"], one["norms"], rtol=1e-5)
  assert two["decodes"] == one["decodes"]


def test_two_processes_as_two_pipeline_stages_train_like_one_device(tmp_path):
  """mesh.dcn_stage=2: each process holds one pipeline stage (fsdp and tensor within it), the
  activations cross between the processes, and the losses are one device's."""
  output = tmp_path / "stages.json"
  worker = [sys.executable, os.path.join(ROOT, "tests", "multihost_worker.py"), "--pipeline"]
  _finish(_start([*worker, f"--output={output}"], 2, tmp_path), 2, tmp_path)
  two = json.loads(output.read_text())
  _, _, _, one = multihost_worker.train(multihost_worker.pipeline_config(True), jax.devices()[:1])
  assert two["stage_processes"] == 2
  assert two["permute_axes"] == ["stage"]
  np.testing.assert_allclose(two["losses"], one, rtol=1e-5)


def _start_run(workdir, processes: int, logdir, *flags, **overrides) -> subprocess.Popen:
  """experiments.run on the cluster config as `processes` processes over 8 devices in all."""
  command = [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *flags]
  return _start([*command, *cluster_flags(**overrides)], processes, logdir, 8 // processes)


def _when_logged(job, workdir, steps: int) -> None:
  """Waits until metrics.jsonl holds `steps` more loss lines than it had."""
  metrics = workdir / "metrics.jsonl"
  target = steps + (metrics.read_text().count('"loss"') if metrics.exists() else 0)
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count('"loss"') >= target):
    assert job.poll() is None and time.time() < deadline, f"{steps} more steps never logged"
    time.sleep(0.2)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
  """{(P, P'): (workdir, outputs before, outputs after)}: the cluster config trained by P
  processes until its last process alone gets SIGTERM, then resumed by P' processes to step 10."""
  runs = {}
  for before, after in ((2, 1), (1, 2)):
    workdir = tmp_path_factory.mktemp(f"from{before}to{after}")
    logs = [tmp_path_factory.mktemp("logs") for _ in range(2)]
    first = _start_run(workdir, before, logs[0], train__total_steps=10)
    _when_logged(first, workdir, 3)
    os.kill(int((logs[0] / f"process_{before - 1}.pid").read_text()), signal.SIGTERM)
    outputs = _finish(first, before, logs[0])
    resumed = _finish(_start_run(workdir, after, logs[1], train__total_steps=10), after, logs[1])
    runs[before, after] = workdir, outputs, resumed
  return runs


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_process_count_with_the_same_batches(
  resumed_runs, cluster_reference, before, after
):
  """Every loss after the resume equals the uninterrupted 1-process run's: the global batches
  depend on neither process count, and the resume continues them where they stopped."""
  workdir, first, second = resumed_runs[before, after]
  # The SIGTERM went to the last process alone: process 0 stopped at the same step.
  stopped = re.search(r"SIGTERM: stopped after step (\d+)", first[0])
  assert stopped, first[0][-2000:]
  step = int(stopped.group(1))
  assert f"resumed from step {step}" in second[0], second[0][-2000:]
  with open(workdir / "metrics.jsonl") as f:
    rows = [m for m in map(json.loads, f) if "loss" in m]
  assert [m["step"] for m in rows] == list(range(1, 11))  # none skipped or repeated
  losses = [m["loss"] for m in rows]
  np.testing.assert_allclose(losses, [cluster_reference[s] for s in range(1, 11)], rtol=1e-5)
  if after == 2:
    assert "resumed" not in second[1], "only process 0 logs"


def test_two_processes_fall_back_from_a_damaged_checkpoint_together(
  resumed_runs, cluster_reference, tmp_path
):
  """The newest checkpoint's largest array file flipped: on_corrupt=fail stops both processes in
  one line; the default warns once and both resume from the step before, as if uninterrupted."""
  workdir, _, _ = resumed_runs[1, 2]
  damage_largest_array_file(workdir / "checkpoints" / "10")
  logs = [tmp_path / "fail", tmp_path / "fallback"]
  for log in logs:
    log.mkdir()
  failing = _start_run(workdir, 2, logs[0], train__total_steps=12, checkpoint__on_corrupt="fail")
  assert failing.wait(timeout=300) != 0
  for i in range(2):
    lines = [x for x in (logs[0] / f"process_{i}.log").read_text().splitlines() if x.strip()]
    assert lines[-1].startswith("error: --workdir: checkpoint") and "checkpoints/10" in lines[-1]
    assert not any("Traceback" in x for x in lines), lines[-20:]
  outputs = _finish(_start_run(workdir, 2, logs[1], train__total_steps=12), 2, logs[1])
  assert outputs[0].count("is unreadable") == 1 and "checkpoints/10 is unreadable" in outputs[0]
  assert "resumed from step 8" in outputs[0], outputs[0][-2000:]
  losses = {}
  with open(workdir / "metrics.jsonl") as f:
    for m in map(json.loads, f):
      if "loss" in m:
        losses[m["step"]] = m["loss"]  # the resumed lines win
  np.testing.assert_allclose(
    [losses[s] for s in range(9, 13)], [cluster_reference[s] for s in range(9, 13)], rtol=1e-5
  )


def test_eval_decode_and_export_under_two_processes_equal_one(resumed_runs, tmp_path):
  workdir, _, _ = resumed_runs[2, 1]
  lines = ["the cat sees a dog", "two birds", "a big red fish eats the small fish", "hello"]
  (tmp_path / "input.txt").write_text("".join(line + "\n" for line in lines))
  base = [sys.executable, "-m", "experiments.run", f"--workdir={workdir}"]
  modes = {
    "eval": ["--mode=eval"],
    "decode": [
      "--mode=decode",
      f"--input={tmp_path / 'input.txt'}",
      f"--output={tmp_path / 'out'}",
    ],
    "export": ["--mode=export", f"--output={tmp_path / 'export'}"],
  }
  outputs = {}
  for mode, flags in modes.items():
    logdir = tmp_path / f"logs_{mode}"
    logdir.mkdir()
    outputs[mode] = _finish(_start([*base, *flags], 2, logdir), 2, logdir)

  # One process, 8 devices: this test process, through the same functions the modes call.
  alone = evaluate.evaluate_workdir(str(workdir))
  together = json.loads(outputs["eval"][0][outputs["eval"][0].index("{") :])
  assert together["step"] == alone["step"] == 10
  for key in ("eval_loss", "eval_accuracy"):
    np.testing.assert_allclose(together[key], alone[key], rtol=1e-5)
  decoder = Decoder.from_workdir(str(workdir))
  assert (tmp_path / "out").read_text().splitlines() == decoder(lines)
  run, params, _, _ = inference.restore_latest(str(workdir))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
  )
  exported = inference.load_export(str(tmp_path / "export"), abstract)
  for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_lost_process_ends_the_job_within_the_heartbeat_timeout(tmp_path):
  """SIGKILL one of 2 processes mid-run, then, in the resumed job, freeze it (SIGSTOP: a hung or
  cut-off host, whose connections stay open and whose heartbeats stop): each time the other
  exits non-zero within the bound, naming what happened, and the next start resumes from the
  latest checkpoint."""
  workdir = tmp_path / "run"
  resumed_from = None
  for round_, lost in enumerate(["SIGKILL", "SIGSTOP"]):
    logdir = tmp_path / f"round{round_}"
    logdir.mkdir()
    job = _start_run(workdir, 2, logdir, "--heartbeat_timeout=10", train__total_steps=100000)
    _when_logged(job, workdir, 4)
    lost_pid = int((logdir / "process_1.pid").read_text())
    os.kill(lost_pid, getattr(signal, lost))
    lost_at = time.time()
    survivor = int((logdir / "process_0.pid").read_text())
    while time.time() - lost_at < 120:
      try:
        os.kill(survivor, 0)
      except ProcessLookupError:
        break
      time.sleep(0.5)
    else:
      os.kill(survivor, signal.SIGKILL)
    elapsed = time.time() - lost_at
    with contextlib.suppress(ProcessLookupError):
      os.kill(lost_pid, signal.SIGKILL)  # a frozen process is still there
    print(f"round {round_}, {lost}: process 0 ended {elapsed:.1f} s after process 1 was lost")
    assert job.wait(timeout=30) != 0
    assert elapsed < 60, elapsed  # the 10 s heartbeat timeout plus detection and shutdown
    # The coordination service ends process 0, naming the silent task, or (a killed process's
    # connections close at once) a collective with it fails first and the runner says so in
    # one line.
    log = (logdir / "process_0.log").read_text()
    named = re.search(r"stopped sending heartbeats\):\s*1\b|Task 1 heartbeat timeout", log)
    if lost == "SIGSTOP":
      assert named, log[-3000:]
    else:
      assert named or "\nerror: a collective failed" in log, log[-3000:]
    if resumed_from is not None:
      assert f"resumed from step {resumed_from}" in log, log[-3000:]
    previous = resumed_from or 0
    run, params, _, resumed_from = inference.restore_latest(str(workdir))
    assert resumed_from > previous  # each round got further and its checkpoint reads whole
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
