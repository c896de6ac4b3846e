"""Hyperparameter sweeps with Optuna; every trial is its own `experiments.run` process.

  python -m experiments.sweep --config=experiments/demo.py --space=experiments/sweeps/demo.py \
      --metric=bleu --trials=8 --sampler=tpe --study_dir=runs/sweep_demo
Hardware: 2 CPU cores. Time: 7.5 minutes (8 trials of 160 steps, 50-63 s each). Result: the table in
docs/sweeps.md; RUNS/sweep_demo/results.md, results.csv, *.png and tb/ (HParams).

The study lives in Optuna storage: STUDY_DIR/study.journal (a journal file: one machine or a
shared filesystem) or --storage=URL (an RDB). Workers (--workers=K here, or one per SLURM array
task, launch/sweep_slurm.sbatch) claim trials under a lock, so exactly --trials run in all. This
process never imports jax: the trials own the accelerators. See docs/sweeps.md.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import optuna
from absl import app, flags
from ml_collections import config_flags
from optuna.trial import TrialState

from experiments import sweep_report, sweep_trial
from experiments.sweep_space import SpaceError, check_fields, load_space, override_flag
from experiments.sweep_study import (
  Sweep,
  claim_lock,
  claim_trial,
  counted,
  local_worker_argv,
  log,
  requeue,
  tell,
)
from lm import config as lmc

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment: module.py[:variant].")
_SPACE = flags.DEFINE_string(
  "space", None, "The search space module, e.g. experiments/sweeps/demo.py."
)
_METRIC = flags.DEFINE_string("metric", None, "An eval record key: bleu, eval_loss, ...")
_DIRECTION = flags.DEFINE_enum(
  "direction",
  None,
  ["maximize", "minimize"],
  "Default: maximize bleu and accuracy, minimize losses.",
)
_TRIALS = flags.DEFINE_integer("trials", None, "Trials in all, over every worker.")
_STUDY_DIR = flags.DEFINE_string("study_dir", None, "Journal, trial workdirs and results.")
_STORAGE = flags.DEFINE_string("storage", None, "An RDB URL instead of STUDY_DIR/study.journal.")
_STUDY_NAME = flags.DEFINE_string("study_name", "sweep", "The study's name in its storage.")
_SAMPLER = flags.DEFINE_enum("sampler", "tpe", ["grid", "random", "tpe"], "Optuna's sampler.")
_PRUNER = flags.DEFINE_enum("pruner", "none", ["none", "median", "asha"], "Optuna's pruner.")
_PRUNE_STARTUP = flags.DEFINE_integer("pruner_startup_trials", 2, "median: trials never pruned.")
_PRUNE_WARMUP = flags.DEFINE_integer(
  "pruner_warmup_steps", 0, "median: steps before pruning; asha: its min_resource (0 = auto)."
)
_WORKERS = flags.DEFINE_integer("workers", 1, "Local worker processes sharing the study.")
_WORKER_INDEX = flags.DEFINE_integer(
  "worker_index", None, "This worker's index (sampler seed); default SLURM_ARRAY_TASK_ID or 0."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampler seed.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the results and exit.")
_REPORT = flags.DEFINE_bool("report", True, "Write the results when this worker is done.")
_KILL_GRACE = flags.DEFINE_float("kill_grace_s", 60.0, "SIGTERM to SIGKILL for a stopped trial.")
_STALE_AFTER = flags.DEFINE_float(
  "stale_after_s",
  600.0,
  "A RUNNING trial of another host without a heartbeat for this long is "
  "retried (on this host, a dead worker pid is enough).",
)

# By the metric's name before any "/PAIR" or "/LABEL" (bleu/en-de, eval_precision/spam).
DIRECTIONS = {"bleu": "maximize", "eval_accuracy": "maximize", "eval_loss": "minimize",
              "eval_perplexity": "minimize", "eval_macro_f1": "maximize",
              "eval_precision": "maximize", "eval_recall": "maximize"}  # fmt: skip
# The eval metrics a task's runs never report.
ABSENT = {"classify": ("bleu", "eval_perplexity"),
          "lm": ("bleu", "eval_macro_f1", "eval_precision", "eval_recall"),
          "translation": ("eval_macro_f1", "eval_precision", "eval_recall")}  # fmt: skip
HEARTBEAT_S = 60.0
POLL_S = 1.0


class Interrupted(Exception):
  """SIGTERM / SIGINT to a worker."""


def main(argv) -> None:
  sweep = resolve_flags(argv)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = open_study(sweep)
  if not _REPORT_ONLY.value:
    if _WORKERS.value > 1:
      code = run_local_workers(_WORKERS.value)
    else:
      code = run_worker(sweep, study)
    if code:
      sys.exit(code)
  if _REPORT.value or _REPORT_ONLY.value:
    for line in sweep_report.write(study, sweep.metric, list(sweep.space.params), sweep.study_dir):
      log(line)


def resolve_flags(argv) -> Sweep:
  """Every flag checked, each in one line, before a study or trial starts."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  for name in ("config", "space", "metric", "trials", "study_dir"):
    if flags.FLAGS[name].value is None:
      fail(f"--{name}: required")
  raw_overrides = [a for a in sys.argv[1:] if a.startswith(("--config.", "--noconfig."))]
  overrides = {}
  for arg in raw_overrides:
    if "=" not in arg and arg.startswith("--config."):
      fail(f"{arg}: give overrides as {arg}=VALUE (they are passed to every trial)")
    field = arg.split("=", 1)[0].removeprefix("--config.").removeprefix("--noconfig.")
    overrides[field] = arg
  try:
    space = load_space(_SPACE.value, grid_needed=_SAMPLER.value == "grid")
    check_fields(space, _CONFIG.value, set(overrides))
  except SpaceError as e:
    fail(str(e))
  cfg = _CONFIG.value  # with the command line's overrides; FIXED goes under them
  cfg.update_from_flattened_dict({f: v for f, v in space.fixed.items() if f not in overrides})
  check_metric(_METRIC.value, cfg)
  try:
    lmc.validate(cfg)  # the base config with FIXED and the overrides; jax-free
  except lmc.ConfigError as e:
    fail(f"--config (with the space's FIXED and the overrides): {e}")
  metric = _METRIC.value
  direction = _DIRECTION.value or DIRECTIONS.get(metric.split("/")[0])
  if direction is None:
    fail(f"--direction: required for --metric={metric} (maximize or minimize)")
  if _PRUNER.value != "none" and not cfg.eval.every:
    fail(f"--pruner={_PRUNER.value}: trials evaluate only at the end; set --config.eval.every")
  if _TRIALS.value < 1:
    fail(f"--trials={_TRIALS.value}: must be at least 1")
  if _SAMPLER.value == "grid" and _TRIALS.value > space.grid_size():
    fail(f"--trials={_TRIALS.value}: the grid has {space.grid_size()} points; ask for at most that")
  if _WORKERS.value < 1:
    fail(f"--workers={_WORKERS.value}: must be at least 1")
  if _STORAGE.value and "://" not in _STORAGE.value:
    fail(f"--storage={_STORAGE.value}: an RDB URL such as sqlite:///sweep.db or postgresql://...")
  fixed = {f: override_flag(f, v) for f, v in space.fixed.items()}
  worker = _WORKER_INDEX.value
  if worker is None:
    worker = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
  return Sweep(
    config_flags.get_config_filename(flags.FLAGS["config"]),
    {**fixed, **overrides}, space, metric, direction, _TRIALS.value,
    os.path.abspath(_STUDY_DIR.value), _STORAGE.value, _STUDY_NAME.value, _SAMPLER.value,
    _SEED.value, worker, _STALE_AFTER.value,
  )  # fmt: skip


def check_metric(metric: str, cfg) -> None:
  """Refuses a metric the trials will never report, before they run."""
  base = metric.split("/")[0]
  if base in ABSENT.get(cfg.task, ()):
    fail(f"--metric={metric}: task={cfg.task} runs do not report {base}; e.g. --metric=eval_loss")
  if base == "bleu" and not cfg.eval.bleu:
    fail(f"--metric={metric}: the config's eval.bleu is False; set --config.eval.bleu=True")


def storage_for(sweep: Sweep) -> optuna.storages.BaseStorage:
  os.makedirs(sweep.study_dir, exist_ok=True)  # the claim lock, trials and results, either way
  if sweep.storage:
    return optuna.storages.RDBStorage(sweep.storage)
  path = os.path.join(sweep.study_dir, "study.journal")
  # The open lock (O_EXCL lock files) holds on local disks and NFSv3+ shared filesystems.
  lock = optuna.storages.journal.JournalFileOpenLock(path)
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path, lock))


SETTINGS = ("config", "metric", "direction", "sampler")


def open_study(sweep: Sweep) -> optuna.Study:
  """The study, created on first use; a rerun must name the same experiment, space, metric and
  sampler (--trials may grow)."""
  storage = storage_for(sweep)
  study = optuna.create_study(
    storage=storage,
    study_name=sweep.study_name,
    direction=sweep.direction,
    load_if_exists=True,
    sampler=sampler_for(sweep, storage),
    pruner=pruner_for(_PRUNER.value),
  )
  settings = {k: getattr(sweep, k) for k in SETTINGS} | {"space": repr(sweep.space.params)}
  settings["overrides"] = sorted(sweep.overrides.values())  # FIXED and --config.* flags
  saved = study.user_attrs.get("settings")
  if saved is None:
    study.set_user_attr("settings", settings)
    return study
  for key, value in settings.items():
    if key == "overrides" and key in saved and saved[key] != value:
      before, now = sorted(set(saved[key]) - set(value)), sorted(set(value) - set(saved[key]))
      fail(
        f"--config.* (with the space's FIXED): the study {sweep.study_name!r} in "
        f"{sweep.storage or sweep.study_dir} was started with {before or 'none'} where this run "
        f"has {now or 'none'}; use the same flags or another --study_dir / --study_name"
      )
    if key != "overrides" and saved.get(key) != value:
      fail(
        f"--{key}: the study {sweep.study_name!r} in "
        f"{sweep.storage or sweep.study_dir} was started with {saved.get(key)!r}, not {value!r}; "
        f"use the same flags or another --study_dir / --study_name"
      )
  return study


def sampler_for(sweep: Sweep, storage) -> optuna.samplers.BaseSampler:
  if sweep.sampler == "grid":  # one seed for all workers: it orders the grid they share
    return optuna.samplers.GridSampler(sweep.space.grid, seed=sweep.seed)
  # Workers, and a rerun of one, must not repeat each other's random draws.
  summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
  existing = sum(s.n_trials for s in summaries if s.study_name == sweep.study_name)
  seed = hash((sweep.seed, sweep.worker, existing)) % 2**31
  if sweep.sampler == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  # TPE's random start: half the trials, 2 to 10 (Optuna's default of 10 would leave an 8-trial
  # sweep all random).
  startup = max(2, min(10, sweep.trials // 2))
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def pruner_for(name: str) -> optuna.pruners.BasePruner:
  if name == "median":
    return optuna.pruners.MedianPruner(_PRUNE_STARTUP.value, _PRUNE_WARMUP.value)
  if name == "asha":
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=_PRUNE_WARMUP.value or "auto")
  return optuna.pruners.NopPruner()


def run_local_workers(count: int) -> int:
  """K worker processes of this command (--workers=1 --worker_index=i); each dies with this one."""
  argv = local_worker_argv(sys.argv[1:])
  command = [sys.executable, "-m", "experiments.sweep", *argv, "--workers=1", "--noreport"]
  workers = [
    subprocess.Popen(
      [*command, f"--worker_index={i}"], preexec_fn=sweep_trial.die_with_parent(os.getpid())
    )
    for i in range(count)
  ]

  def forward(signum, frame):
    for w in workers:
      w.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  return max(abs(w.wait()) for w in workers)


def run_worker(sweep: Sweep, study: optuna.Study) -> int:
  """Claims and runs trials until the study has --trials; 128 + signal when stopped."""

  def interrupt(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the clean-up short
      signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)

  signal.signal(signal.SIGTERM, interrupt)
  signal.signal(signal.SIGINT, interrupt)
  try:
    while (claimed := claim_trial(sweep, study)) is not None:
      try:
        run_trial(sweep, study, *claimed)
      except optuna.exceptions.UpdateFinishedTrialError:  # run_trial stopped its process
        number = claimed[0].number
        log(f"trial {number}: another worker judged it stale and queued it again; stopped")
      log(progress(sweep, study))
  except Interrupted as e:
    log(f"worker {sweep.worker}: {e}: stopped; rerun the same command to continue")
    return 128 + signal.Signals[str(e)].value
  return 0


def run_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, values: dict) -> None:
  """Runs the trial's process to its end, reporting each eval to the pruner; tells the study."""
  workdir = os.path.join(sweep.study_dir, "trials", str(trial.number))
  shown = "  ".join(
    f"{f}={v:.4g}" if isinstance(v, float) else f"{f}={v}" for f, v in values.items()
  )
  log(f"trial {trial.number} started (worker {sweep.worker}): {shown}")
  started = time.time()
  process = sweep_trial.start(sweep.command(workdir, values), workdir)
  trial.set_user_attr("trial_pid", process.pid)
  records = sweep_trial.EvalRecords(workdir, sweep.metric)
  last, pruned, beat = None, False, time.time()
  try:
    while not pruned:
      code = sweep_trial.wait_poll(process, POLL_S)
      for step, value in records.new():
        last = (step, value)
        trial.report(value, step)
        if code is None and trial.should_prune():
          pruned = True
          log(f"trial {trial.number} pruned at step {step}: {sweep.metric} {value:.4g}")
          sweep_trial.stop(process, _KILL_GRACE.value)
          break
      if code is not None:
        break
      if time.time() - beat > HEARTBEAT_S:
        trial.set_user_attr("heartbeat", beat := time.time())
  except Interrupted:
    sweep_trial.stop(process, _KILL_GRACE.value)
    with claim_lock(sweep):
      requeue(study, study._storage.get_trial(trial._trial_id), "interrupted by a signal")
    raise
  except optuna.exceptions.UpdateFinishedTrialError:  # finished by another worker's claim
    sweep_trial.stop(process, _KILL_GRACE.value)
    raise
  trial.set_user_attr("steps", steps := sweep_trial.steps_reached(workdir, records))
  trial.set_user_attr("wall_s", round(time.time() - started, 1))
  if pruned:
    tell(study, trial, state=TrialState.PRUNED)
  else:
    finish(sweep, study, trial, process.returncode, last, steps, records)


def finish(sweep, study, trial, code: int, last, steps: int, records) -> None:
  """Tells the study how a trial that ran to its end did: COMPLETE with its last eval's metric,
  or FAIL with a one-line error."""
  error, total = None, sweep_trial.total_steps(records.workdir)
  if code != 0:
    error = sweep_trial.last_error_line(records.workdir) or sweep_trial.exit_description(code)
  elif last is None:
    keys = ", ".join(sorted(records.eval_keys)) or "none"
    error = f"no eval record has {sweep.metric!r} (eval records have: {keys})"
  elif total and steps < total:
    error = f"stopped at step {steps} of {total} by a signal from outside the sweep"
  elif not math.isfinite(last[1]):
    error = f"{sweep.metric} is {last[1]} at step {last[0]}"
  if error:
    trial.set_user_attr("error", error)
    tell(study, trial, state=TrialState.FAIL)
    log(f"trial {trial.number} failed: {error}")
    return
  tell(study, trial, last[1])
  log(f"trial {trial.number} complete: {sweep.metric} {last[1]:.4g} at step {last[0]}")


def progress(sweep: Sweep, study: optuna.Study) -> str:
  """Counts of the counted trials and an ETA: mean trial time over the trials running at once."""
  trials = counted(study.get_trials(deepcopy=False))
  states = [t.state for t in trials]
  done = [t for t in trials if t.state.is_finished()]
  counts = {s: states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
  running = max(1, states.count(TrialState.RUNNING))
  walls = [t.user_attrs["wall_s"] for t in done if "wall_s" in t.user_attrs]
  left = sweep.trials - len(done)
  eta = int(left * sum(walls) / len(walls) / running) if walls else 0
  return (
    f"{len(done)}/{sweep.trials} finished: {counts[TrialState.COMPLETE]} complete, "
    f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed; "
    f"{states.count(TrialState.RUNNING)} running; eta {eta // 60}m{eta % 60:02d}s"
  )


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
