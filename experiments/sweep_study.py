"""The study the workers of a sweep share: what they agree on (Sweep), claiming trials under a
lock so exactly --trials run, and retrying trials whose worker is gone."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from experiments import sweep_trial
from experiments.sweep_space import Space, override_flag

HOST = socket.gethostname()
MAX_RETRIES = 2  # a trial interrupted more often than this stays FAIL (it counts)
# A claim holds the lock for about a second; one left by a killed worker is broken after this
# (Optuna's default of 30 s could break a claim stalled on a slow shared filesystem).
CLAIM_LOCK_GRACE_S = 300


@dataclasses.dataclass
class Sweep:
  """What every worker of one sweep shares: the flags, resolved."""

  config: str  # the --config value, passed to every trial
  overrides: dict[str, str]  # field -> --config flag, FIXED then the command line's
  space: Space
  metric: str
  direction: str
  trials: int
  study_dir: str
  storage: str | None
  study_name: str
  sampler: str
  seed: int
  worker: int
  stale_after_s: float

  def command(self, workdir: str, values: dict) -> list[str]:
    params = [override_flag(f, v) for f, v in values.items()]
    run = [sys.executable, "-m", "experiments.run", f"--config={self.config}"]
    return [*run, f"--workdir={workdir}", *self.overrides.values(), *params]


@contextlib.contextmanager
def claim_lock(sweep: Sweep):
  """One worker at a time counts, recovers and asks (a lock file in STUDY_DIR; one left by a
  killed worker is broken after CLAIM_LOCK_GRACE_S)."""
  path = os.path.join(sweep.study_dir, "claim")
  lock = optuna.storages.journal.JournalFileOpenLock(path, grace_period=CLAIM_LOCK_GRACE_S)
  lock.acquire()
  try:
    yield
  finally:
    lock.release()


def counted(trials) -> list:
  """The trials that count towards --trials: all but those interrupted and retried."""
  return [t for t in trials if not t.user_attrs.get("retried")]


def claim_trial(sweep: Sweep, study: optuna.Study):
  """(trial, field values) of a new or retried trial, or None when --trials are claimed."""
  with claim_lock(sweep):
    retry_stale_trials(sweep, study)
    trials = counted(study.get_trials(deepcopy=False))
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if len(trials) >= sweep.trials and not waiting:
      return None
    trial = study.ask()  # a waiting (retried) trial first
    values = sweep.space.suggest(trial)
    for key, value in worker_attrs(sweep).items():
      trial.set_user_attr(key, value)
  return trial, values


def worker_attrs(sweep: Sweep) -> dict:
  return {"host": HOST, "pid": os.getpid(), "worker": sweep.worker, "heartbeat": time.time()}


def worker_alive(attrs: dict, stale_after_s: float) -> bool:
  if "pid" not in attrs:  # claimed by a worker killed inside the claim lock
    return False
  if attrs["host"] != HOST:
    return time.time() - attrs["heartbeat"] < stale_after_s
  if attrs["pid"] == os.getpid():  # a dead worker's pid, reused by this one (between trials)
    return False
  try:
    with open(f"/proc/{attrs['pid']}/cmdline", "rb") as f:
      return b"experiments.sweep" in f.read()  # not a reused pid
  except FileNotFoundError:
    return False
  except OSError:  # no /proc: the pid alone
    return _pid_exists(attrs["pid"])


def _pid_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def retry_stale_trials(sweep: Sweep, study: optuna.Study) -> None:
  """RUNNING trials whose worker is gone: their process killed if it is still here, marked FAIL
  and `retried`, and their parameters queued again as a new trial (which counts instead)."""
  for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    attrs = trial.user_attrs
    if worker_alive(attrs, sweep.stale_after_s):
      continue
    if attrs.get("host") == HOST and attrs.get("trial_pid"):
      sweep_trial.signal_group(attrs["trial_pid"], signal.SIGKILL)
    where = f"{attrs.get('host', '?')} pid {attrs.get('pid', '?')}"
    queued = requeue(study, trial, f"interrupted: its worker ({where}) stopped")
    again = "and queued again" if queued else f"(not queued again: {MAX_RETRIES} retries)"
    log(f"trial {trial.number}: its worker ({where}) is gone; marked failed {again}")


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
  """Marks an interrupted trial FAIL and `retried` and queues its parameters again as a new
  trial (True); after MAX_RETRIES retries it stays FAIL (and counts) instead."""
  retries = trial.user_attrs.get("retries", 0)
  storage = study._storage  # another worker's trial: only the storage sets its attributes
  try:
    if retries >= MAX_RETRIES:
      reason += f"; interrupted {retries + 1} times, not retried again"
    else:
      reason += "; retried"
      storage.set_trial_user_attr(trial._trial_id, "retried", True)
    storage.set_trial_user_attr(trial._trial_id, "error", reason)
  except optuna.exceptions.UpdateFinishedTrialError:
    return False  # its worker finished it meanwhile
  tell(study, trial.number, state=TrialState.FAIL)
  if retries >= MAX_RETRIES:
    return False
  # GridSampler.after_trial reads a trial's grid_id: the retry takes its original's grid point
  # (enqueue_trial would give it none).
  system = storage.get_trial_system_attrs(trial._trial_id)
  grid = {k: system[k] for k in ("grid_id", "search_space") if k in system}
  user = {"retry_of": trial.number, "retries": retries + 1}
  fixed = {"fixed_params": trial.params, **grid}
  study.add_trial(create_trial(state=TrialState.WAITING, system_attrs=fixed, user_attrs=user))
  return True


def tell(study: optuna.Study, trial, *args, **kwargs) -> None:
  """study.tell; a trial another worker has already finished (judged stale and retried) is left
  as it is. GridSampler calls study.stop() once its grid is done, which only works inside
  study.optimize; the state is stored before that, and the workers' own count ends the sweep."""
  try:
    study.tell(trial, *args, skip_if_finished=True, **kwargs)
  except RuntimeError as e:
    if "Study.stop" not in str(e):
      raise


LOCAL_ONLY_FLAGS = {"workers": True, "worker_index": True, "report": False, "noreport": False}


def local_worker_argv(argv: list[str]) -> list[str]:
  """`argv` without the flags a local worker sets itself (flag name -> takes a value), in
  either of absl's forms: --workers=2 or --workers 2."""
  kept, value_next = [], False
  for arg in argv:
    if value_next:  # the value of a dropped two-token flag
      value_next = False
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name in LOCAL_ONLY_FLAGS:
      value_next = LOCAL_ONLY_FLAGS[name] and "=" not in arg
      continue
    kept.append(arg)
  return kept


def log(message: str) -> None:
  print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)
