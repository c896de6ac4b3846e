"""One trial's `experiments.run` process: started in its own process group with a parent-death
signal, its metrics.jsonl tailed for eval records, stopped by SIGTERM (the run saves and stops
at its next step) then SIGKILL."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int):
  """A preexec_fn: the child gets SIGKILL when the process that started it dies, even by
  SIGKILL (Linux's PR_SET_PDEATHSIG; elsewhere nothing, and a killed sweep's next start kills
  the trial it finds still running). If the parent is already gone, the child exits at once."""

  def preexec() -> None:
    if sys.platform.startswith("linux"):
      ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # died before prctl took effect
      os._exit(1)

  return preexec


def start(command: list[str], workdir: str) -> subprocess.Popen:
  """The command in a new session (its own process group, so stopping it reaches every process
  it starts), stdout and stderr to WORKDIR/stdout.log and stderr.log."""
  os.makedirs(workdir, exist_ok=True)
  with (
    open(os.path.join(workdir, "stdout.log"), "ab") as out,
    open(os.path.join(workdir, "stderr.log"), "ab") as err,
  ):
    return subprocess.Popen(
      command,
      stdout=out,
      stderr=err,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
      preexec_fn=die_with_parent(os.getpid()),
    )


def stop(process: subprocess.Popen, grace_s: float) -> None:
  """SIGTERM to the process group; SIGKILL to it after grace_s seconds."""
  signal_group(process.pid, signal.SIGTERM)
  try:
    process.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    pass
  signal_group(process.pid, signal.SIGKILL)
  process.wait()


def signal_group(pid: int, signum: int) -> None:
  try:
    os.killpg(pid, signum)
  except ProcessLookupError:
    pass


class EvalRecords:
  """New eval records of a run's metrics.jsonl (lm/metrics.py appends one JSON object a line:
  {"step": ..., "loss": ...} after logging steps, {"step": ..., "eval_loss": ..., "bleu": ...}
  after each evaluation), read as the run writes them."""

  def __init__(self, workdir: str, metric: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.metric = metric
    self.offset = 0
    self.last_step = 0
    self.eval_keys: set[str] = set()

  def new(self) -> list[tuple[int, float]]:
    """(step, metric) of each eval record written since the last call."""
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      data = f.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next call
    self.offset += len(complete)
    found = []
    for line in complete.decode().splitlines():
      if not line.strip():
        continue
      record = json.loads(line)
      self.last_step = max(self.last_step, int(record.get("step", 0)))
      if any(k.startswith("eval_") or k == "bleu" for k in record):
        self.eval_keys.update(k for k in record if k != "step")
      if self.metric in record:
        found.append((int(record["step"]), float(record[self.metric])))
    return found


def steps_reached(workdir: str, records: EvalRecords) -> int:
  """The last step the run logged or saved (a stopped run saves the step it stopped at)."""
  saved = [0]
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints):
    saved += [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
  return max(records.last_step, *saved)


def total_steps(workdir: str) -> int | None:
  """train.total_steps of the run's config.json (written at its start), if there is one."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return int(json.load(f)["train"]["total_steps"])
  except (OSError, ValueError, KeyError):
    return None


def last_error_line(workdir: str) -> str:
  """The last non-empty line of the trial's stderr: the run's one-line error or the exception of
  a traceback."""
  try:
    with open(os.path.join(workdir, "stderr.log"), "rb") as f:
      f.seek(max(0, os.path.getsize(f.name) - 65536))
      lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
  except OSError:
    return ""
  lines = [line for line in lines if line]
  return lines[-1][:500] if lines else ""


def exit_description(code: int) -> str:
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return f"exit status {code}"


def wait_poll(process: subprocess.Popen, seconds: float) -> int | None:
  """The exit code if the process ends within `seconds`, else None."""
  try:
    return process.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    return None
