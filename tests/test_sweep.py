"""Sweeps (experiments/sweep.py): real experiments.run trials of the tiny demo, 12 steps each,
evaluated every 4, on 1 CPU device; the sweep processes themselves never load jax."""

import csv
import os
import signal
import struct
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import optuna
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from tests.helpers import forked_command_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIAL_FLAGS = [
  "--config=experiments/demo.py:tiny",
  "--config.train.total_steps=12",
  "--config.train.log_every=4",
  "--config.eval.every=4",
  "--config.eval.examples=0",
  "--config.eval.bleu=False",
  "--config.data.eval_examples=16",
  "--config.data.tokenizer_sample=2000",
  "--config.train.global_batch_size=16",
  "--config.checkpoint.every=0",
]
# Reports whether the sweep process loaded jax (it runs the module as `python -m` would).
JAX_CHECK = (
  "import atexit, runpy, sys; sys.argv = ['experiments.sweep', *sys.argv[1:]]; "
  "atexit.register(lambda: print('jax loaded:', 'jax' in sys.modules)); "
  "runpy.run_module('experiments.sweep', run_name='__main__', alter_sys=True)"
)


def _env(**extra):
  """Trials on 1 CPU device, LLVM at -O0 (compiling dominates), sharing the session's cache."""
  flags = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def _space(path, text):
  path.write_text("from experiments.sweep_space import Choice, Float, Int\n" + text)
  return str(path)


def _sweep_args(study_dir, space, *extra):
  return [
    *TRIAL_FLAGS,
    f"--space={space}",
    "--metric=eval_loss",
    f"--study_dir={study_dir}",
    *extra,
  ]


def _run_sweep(args, timeout=300, check_jax=True):
  command = (
    [sys.executable, "-c", JAX_CHECK] if check_jax else [sys.executable, "-m", "experiments.sweep"]
  )
  return subprocess.run(
    [*command, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
  )


def _study(study_dir):
  path = os.path.join(study_dir, "study.journal")
  storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
  return optuna.load_study(study_name="sweep", storage=storage)


def _params(trial):
  return tuple(sorted(trial.params.items()))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
  """A 2x2 grid (Choice fields) over 2 local workers, 4 trials."""
  tmp = tmp_path_factory.mktemp("two_workers")
  space = _space(
    tmp / "space.py",
    'SPACE = {"optim.learning_rate": Choice(2e-3, 6e-3), "optim.warmup_steps": Choice(0, 4)}\n',
  )
  args = _sweep_args(tmp / "study", space, "--sampler=grid", "--trials=4", "--workers=2")
  result = _run_sweep(args, check_jax=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "study", result


def test_two_local_workers_run_exactly_the_trials_without_duplicates(two_workers):
  study_dir, result = two_workers
  trials = _study(study_dir).trials
  assert [t.number for t in trials] == [0, 1, 2, 3]
  assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
  assert len({_params(t) for t in trials}) == 4  # every grid point once
  assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both workers took trials
  assert all(t.user_attrs["steps"] == 12 for t in trials)  # the overrides reached each trial
  assert sorted(os.listdir(study_dir / "trials")) == ["0", "1", "2", "3"]
  assert "4/4 finished: 4 complete, 0 pruned, 0 failed" in result.stdout


def test_results_table_is_sorted_by_the_metric_with_every_column(two_workers):
  study_dir, _ = two_workers
  with open(study_dir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  columns = ["trial", "optim.learning_rate", "optim.warmup_steps", "eval_loss", "state", "steps"]
  assert list(rows[0])[:6] == columns and "wall_s" in rows[0]
  losses = [float(r["eval_loss"]) for r in rows]
  assert len(rows) == 4 and losses == sorted(losses)  # minimized: best first
  best = _study(study_dir).best_trial
  assert int(rows[0]["trial"]) == best.number and float(rows[0]["eval_loss"]) == best.value
  assert all(float(r["wall_s"]) > 0 for r in rows)
  markdown = (study_dir / "results.md").read_text().splitlines()
  assert markdown[0].startswith("| trial | optim.learning_rate") and len(markdown) == 6
  assert markdown[2].startswith(f"| {best.number} |")


@pytest.mark.parametrize(
  "name", ["optimization_history.png", "param_importances.png", "parallel_coordinate.png"]
)
def test_plots_are_nonblank_pngs(two_workers, name):
  study_dir, _ = two_workers
  path = study_dir / name
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # drawn, not blank


def _records(path):
  """The events of a TensorBoard file (TFRecord framing: length, its CRC, data, its CRC)."""
  data, events = path.read_bytes(), []
  while data:
    (length,) = struct.unpack("<Q", data[:8])
    events.append(event_pb2.Event.FromString(data[12 : 12 + length]))
    data = data[16 + length :]
  return events


def test_tensorboard_hparams_has_one_session_per_trial(two_workers):
  study_dir, _ = two_workers
  trials = {t.number: t for t in _study(study_dir).trials}
  sessions = {}
  for root, _, files in os.walk(study_dir / "tb"):
    for name in files:
      for event in _records(type(study_dir)(root) / name):
        for value in event.summary.value:
          if value.tag == "_hparams_/session_start_info":
            data = plugin_hparams_pb2.HParamsPluginData.FromString(
              value.metadata.plugin_data.content
            )
            hparams = data.session_start_info.hparams
            sessions[os.path.basename(root)] = hparams["optim.learning_rate"].number_value
          elif value.tag == "eval_loss":
            sessions[os.path.basename(root) + "/eval_loss"] = value.simple_value
  assert sorted(k for k in sessions if "/" not in k) == [f"trial_{n:04d}" for n in range(4)]
  for n, trial in trials.items():
    assert sessions[f"trial_{n:04d}"] == pytest.approx(trial.params["optim.learning_rate"])
    assert sessions[f"trial_{n:04d}/eval_loss"] == pytest.approx(trial.value)


def test_a_rerun_with_other_overrides_is_refused_in_one_line(two_workers):
  study_dir, _ = two_workers
  args = _sweep_args(study_dir, study_dir.parent / "space.py", "--sampler=grid", "--trials=4")
  result = _run_sweep([*args, "--config.train.total_steps=13", "--report_only"], check_jax=False)
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
  assert result.stderr.startswith("error: --config.* (with the space's FIXED): the study 'sweep'")
  changed = "['--config.train.total_steps=12'] where this run has ['--config.train.total_steps=13']"
  assert changed in result.stderr


def test_report_only_rewrites_the_results_without_loading_jax(two_workers):
  study_dir, _ = two_workers
  os.remove(study_dir / "results.csv")
  args = _sweep_args(study_dir, study_dir.parent / "space.py", "--sampler=grid", "--trials=4")
  result = _run_sweep([*args, "--report_only"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "jax loaded: False" in result.stdout
  assert len((study_dir / "results.csv").read_text().splitlines()) == 5
  assert sorted(os.listdir(study_dir / "tb")) == [f"trial_{n:04d}" for n in range(4)]  # kept
  assert not [name for name in os.listdir(study_dir) if name.endswith(".tmp")]


def _grid_seed_with_first(grid, value):
  """A seed under which Optuna's GridSampler (which shuffles the grid by its seed) starts with
  `value` of the grid's one field."""
  ((field, values),) = grid.items()
  for seed in range(100):
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=seed))
    if study.ask().suggest_categorical(field, values) == value:
      return seed
  raise AssertionError("no seed")


@pytest.fixture(scope="module")
def pruned_sweep(tmp_path_factory):
  """One worker, median pruning after 1 complete trial: a good learning rate first (it
  completes), a hopeless one (pruned at its first evaluation) and a negative one (the run
  rejects it)."""
  tmp = tmp_path_factory.mktemp("pruned")
  rates = [3e-3, 1e-7, -1.0]
  space = _space(tmp / "space.py", f'SPACE = {{"optim.learning_rate": Choice(*{rates})}}\n')
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  seed = _grid_seed_with_first({"optim.learning_rate": rates}, 3e-3)
  extra = ["--sampler=grid", "--trials=3", "--pruner=median", "--pruner_startup_trials=1"]
  extra.append("--config.train.total_steps=40")  # still training when its first eval is read
  result = _run_sweep(_sweep_args(tmp / "study", space, *extra, f"--seed={seed}"))
  assert result.returncode == 0, result.stderr[-3000:]
  trials = {t.params["optim.learning_rate"]: t for t in _study(tmp / "study").trials}
  return trials, result, tmp / "study"


def test_median_pruner_stops_a_hopeless_trial_with_fewer_steps(pruned_sweep):
  trials, result, _ = pruned_sweep
  good, hopeless = trials[3e-3], trials[1e-7]
  assert good.state == optuna.trial.TrialState.COMPLETE
  assert hopeless.state == optuna.trial.TrialState.PRUNED
  assert good.user_attrs["steps"] == 40 and 4 <= hopeless.user_attrs["steps"] < 40
  assert list(hopeless.intermediate_values) == [4]  # pruned at its first evaluation
  assert hopeless.intermediate_values[4] > good.intermediate_values[4]
  assert f"trial {hopeless.number} pruned at step 4" in result.stdout


def test_a_bad_value_fails_its_trial_with_the_runs_error_line_and_the_sweep_goes_on(pruned_sweep):
  trials, result, study_dir = pruned_sweep
  bad = trials[-1.0]
  assert bad.state == optuna.trial.TrialState.FAIL
  assert bad.user_attrs["error"] == "error: config.optim.learning_rate: -1.0 must be a number > 0"
  assert len(trials) == 3 and "3/3 finished: 1 complete, 1 pruned, 1 failed" in result.stdout
  table = (study_dir / "results.md").read_text()
  assert "| fail |" in table and "-1.0 must be a number > 0" in table


def test_the_sweep_and_its_worker_never_load_jax(pruned_sweep):
  _, result, _ = pruned_sweep  # one worker: the trials ran from the process that was checked
  assert "jax loaded: False" in result.stdout


def test_sigkilled_sweep_rerun_retries_the_running_trial_and_counts_each_once(tmp_path):
  space = _space(
    tmp_path / "space.py", 'SPACE = {"optim.learning_rate": Float(1e-3, 1e-2, log=True)}\n'
  )
  args = _sweep_args(tmp_path / "study", space, "--sampler=random", "--trials=1")
  command = [sys.executable, "-m", "experiments.sweep", *args]
  sweep = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
  metrics = tmp_path / "study" / "trials" / "0" / "metrics.jsonl"
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    time.sleep(0.5)  # trial 0 is training
  killed = _study(tmp_path / "study").trials[0]
  assert killed.state == optuna.trial.TrialState.RUNNING
  sweep.send_signal(signal.SIGKILL)
  sweep.wait()
  deadline = time.time() + 10
  while _alive(killed.user_attrs["trial_pid"]) and time.time() < deadline:
    time.sleep(0.2)
  assert not _alive(killed.user_attrs["trial_pid"])  # the trial died with its sweep

  result = subprocess.run(
    command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  trials = _study(tmp_path / "study").trials
  assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].user_attrs["retried"]
  counted = [t for t in trials if not t.user_attrs.get("retried")]
  assert len(trials) == 2 and len(counted) == 1
  (retry,) = counted
  assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
  assert retry.params == killed.params and retry.user_attrs["steps"] == 12
  assert "1/1 finished: 1 complete" in result.stdout
  assert "(retried)" in (tmp_path / "study" / "results.md").read_text()


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


def test_slurm_array_runs_two_workers_against_one_journal(tmp_path):
  """Two simulated array tasks of launch/sweep_slurm.sbatch, started together."""
  space = _space(
    tmp_path / "space.py", 'SPACE = {"optim.learning_rate": Float(1e-3, 1e-2, log=True)}\n'
  )
  args = _sweep_args(tmp_path / "study", space, "--sampler=random", "--trials=2")
  tasks = []
  for task in range(2):
    env = _env(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID=str(task), SLURM_SUBMIT_DIR=ROOT,
               PYTHON=sys.executable)  # fmt: skip
    log = open(tmp_path / f"task_{task}.log", "w")
    script = os.path.join(ROOT, "launch", "sweep_slurm.sbatch")
    tasks.append(
      subprocess.Popen(["bash", script, *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
    )
  codes = [t.wait(timeout=300) for t in tasks]
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
  trials = _study(tmp_path / "study").trials
  assert [t.number for t in trials] == [0, 1]  # each claimed one; neither claimed a third
  assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
  assert len({_params(t) for t in trials}) == 2  # their samplers are seeded apart
  assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # each task's SLURM_ARRAY_TASK_ID
  for task, log in enumerate(logs):
    assert f"started (worker {task})" in log


def test_an_rdb_url_holds_the_study_instead_of_the_journal(tmp_path):
  space = _space(tmp_path / "space.py", 'SPACE = {"optim.warmup_steps": Int(0, 8)}\n')
  url = f"sqlite:///{tmp_path / 'study.db'}"
  args = _sweep_args(tmp_path / "study", space, "--trials=1", f"--storage={url}")
  result = _run_sweep(args, check_jax=False)
  assert result.returncode == 0, result.stderr[-3000:]
  (trial,) = optuna.load_study(study_name="sweep", storage=url).trials
  assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["steps"] == 12
  assert not (tmp_path / "study" / "study.journal").exists()
  rows = list(csv.DictReader(open(tmp_path / "study" / "results.csv")))
  assert [int(r["optim.warmup_steps"]) for r in rows] == [trial.params["optim.warmup_steps"]]


BAD_FLAGS = [
  (["--trials=0"], "--trials=0: must be at least 1"),
  (["--trials=2", "--sampler=grid"], "--sampler=grid needs a GRID dict"),
  (["--trials=2", "--metric=loss_x"], "--direction: required for --metric=loss_x"),
  (
    ["--trials=2", "--pruner=median", "--config.eval.every=0"],
    "--pruner=median: trials evaluate",
  ),
  (["--trials=2", "--config.optim.learning_rate=1"], "--config.optim.learning_rate: the space"),
  (["--trials=2", "--config.optim.b1=2.0"], "config.optim.b1: 2.0 must lie in [0, 1)"),
  (["--trials=2", "--config.task=lm", "--metric=bleu/en-de"], "task=lm runs do not report bleu"),
  (["--trials=2", "--metric=eval_macro_f1"], "task=translation runs do not report eval_macro"),
]


@pytest.fixture(scope="module")
def bad_sweeps(tmp_path_factory):
  """(study dir, exit code, stderr) of each BAD_FLAGS sweep, then of one whose space names a
  field the config lacks (space path last): children of one process that imported the sweep
  (tests/helpers.py:forked_command_lines), each `python -m experiments.sweep` but for the
  import."""
  tmp = tmp_path_factory.mktemp("bad_sweeps")
  space = _space(tmp / "space.py", 'SPACE = {"optim.learning_rate": Float(1e-3, 1e-2, log=True)}\n')
  argvs = [_sweep_args(tmp / f"study{i}", space, *extra) for i, (extra, _) in enumerate(BAD_FLAGS)]
  typo = _space(tmp / "typo.py", 'SPACE = {"optim.learnin_rate": Float(1e-3, 1e-2)}\n')
  argvs.append(_sweep_args(tmp / "study_typo", typo, "--trials=2"))
  results = forked_command_lines("experiments.sweep", argvs, tmp, env=_env())
  studies = [tmp / f"study{i}" for i in range(len(BAD_FLAGS))] + [tmp / "study_typo"]
  return [(study, *result) for study, result in zip(studies, results, strict=True)], typo


@pytest.mark.parametrize("case", range(len(BAD_FLAGS)), ids=[m for _, m in BAD_FLAGS])
def test_bad_flags_fail_in_one_line_before_any_trial(bad_sweeps, case):
  study_dir, returncode, stderr = bad_sweeps[0][case]
  assert returncode == 2 and BAD_FLAGS[case][1] in stderr, stderr[-2000:]
  assert len(stderr.strip().splitlines()) == 1
  assert not (study_dir / "trials").exists()


def test_a_space_field_missing_from_the_config_is_named(bad_sweeps):
  results, space = bad_sweeps
  _, returncode, stderr = results[-1]
  assert returncode == 2
  assert stderr.strip() == (
    f"error: --space: {space}: 'optim.learnin_rate' is not a config field of --config"
  )


def test_a_bad_flag_of_its_own_sweep_process_fails_in_one_line(tmp_path):
  """One of BAD_FLAGS through `python -m experiments.sweep` itself."""
  space = _space(tmp_path / "space.py", 'SPACE = {"optim.learning_rate": Float(1e-3, 1e-2)}\n')
  extra, message = BAD_FLAGS[2]
  result = _run_sweep(_sweep_args(tmp_path / "study", space, *extra), check_jax=False)
  assert result.returncode == 2 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_demo_space_module_fits_the_demo_config():
  """The shipped space: a log range for the learning rate, an int range for warmup, short trials;
  every searched and fixed field is a field of experiments/demo.py of the value's type."""
  from experiments import demo
  from experiments.sweep_space import Float, Int, SpaceError, check_fields, load_space

  space = load_space(os.path.join(ROOT, "experiments/sweeps/demo.py"), grid_needed=True)
  assert space.params["optim.learning_rate"] == Float(3e-4, 3e-2, log=True)
  assert isinstance(space.params["optim.warmup_steps"], Int)
  assert space.fixed["train.total_steps"] == 160 and space.fixed["eval.every"] == 40
  assert space.grid_size() == 9
  cfg = demo.get_config()
  kinds = {Float: float, Int: int}
  fields = {f: kinds[type(p)] for f, p in space.params.items()}
  fields |= {f: type(v) for f, v in space.fixed.items()}
  for field, kind in fields.items():
    assert type(cfg[field.split(".")[0]][field.split(".")[1]]) is kind, field
  for field, values in space.grid.items():
    assert {type(v) for v in values} == {fields[field]}, field
  check_fields(space, cfg, set())
  space.fixed["train.total_steps"] = "160"  # a FIXED value of the wrong type: one line
  with pytest.raises(SpaceError, match=r"FIXED\['train.total_steps'\]: '160' does not fit"):
    check_fields(space, cfg, set())


def test_local_workers_drop_the_worker_flags_in_either_form():
  from experiments.sweep_study import local_worker_argv

  argv = ["--workers", "2", "--trials=4", "--worker_index=1", "--noreport", "--report"]
  argv += ["--workers=3", "--worker_index", "0", "--config.train.total_steps=12", "--seed", "5"]
  kept = ["--trials=4", "--config.train.total_steps=12", "--seed", "5"]
  assert local_worker_argv(argv) == kept


def test_a_requeued_grid_trial_keeps_its_grid_point_and_retries_are_capped():
  """At Optuna level: the retry of an interrupted grid trial finishes with one grid point left
  (GridSampler.after_trial reads its grid_id); a trial interrupted MAX_RETRIES + 1 times stays
  FAIL and counts; telling a trial another worker already finished is no error."""
  from experiments.sweep_study import MAX_RETRIES, counted, requeue, tell

  grid = {"x": [1, 2]}
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
  first = study.ask()
  first.suggest_categorical("x", grid["x"])
  assert requeue(study, study._storage.get_trial(first._trial_id), "interrupted")
  tell(study, first, 1.0)  # its worker, still alive, is left with a finished trial: skipped
  retry = study.ask()
  assert retry.suggest_categorical("x", grid["x"]) == first.params["x"]
  tell(study, retry, 1.0)
  assert study.trials[1].state == optuna.trial.TrialState.COMPLETE
  assert study.trials[0].state == optuna.trial.TrialState.FAIL and study.trials[0].value is None

  trial = study.ask()  # the other grid point, interrupted again and again
  trial.suggest_categorical("x", grid["x"])
  for _ in range(MAX_RETRIES):
    assert requeue(study, study._storage.get_trial(trial._trial_id), "interrupted")
    trial = study.ask()
    trial.suggest_categorical("x", grid["x"])
  assert not requeue(study, study._storage.get_trial(trial._trial_id), "interrupted")
  last = study.trials[-1]
  assert last.state == optuna.trial.TrialState.FAIL and not last.user_attrs.get("retried")
  assert last.user_attrs["error"] == "interrupted; interrupted 3 times, not retried again"
  assert len(study.trials) == 5 and [t.number for t in counted(study.trials)] == [1, 4]
  assert all(t.params == {"x": last.params["x"]} for t in study.trials[2:])
