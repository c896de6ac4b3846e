"""A sweep's results in STUDY_DIR: results.md and results.csv (trials sorted by the metric),
PNG plots by optuna.visualization.matplotlib, and TensorBoard HParams under tb/."""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import shutil
import socket
import warnings

import matplotlib

matplotlib.use("Agg")  # files only; no display

import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState
from optuna.visualization import matplotlib as plots
from tensorboardX import SummaryWriter

PLOTS = {
  "optimization_history.png": plots.plot_optimization_history,
  "param_importances.png": plots.plot_param_importances,
  "parallel_coordinate.png": plots.plot_parallel_coordinate,
}


def write(study: optuna.Study, metric: str, fields: list[str], study_dir: str) -> list[str]:
  """Writes every result file; returns the lines to print (the table and what was skipped)."""
  trials = study.get_trials(deepcopy=False)
  rows = table_rows(study, trials, metric, fields)
  header = ["trial", *fields, metric, "state", "steps", "wall_s", "error"]
  _replace(os.path.join(study_dir, "results.csv"), lambda f: _csv(f, header, rows))
  markdown = markdown_table(header, rows)
  _replace(os.path.join(study_dir, "results.md"), lambda f: f.write(markdown + "\n"))
  messages = [f"results: {study_dir}/results.md, results.csv", *markdown.splitlines()]
  messages += write_plots(study, metric, study_dir)
  messages.append(write_hparams(trials, metric, fields, os.path.join(study_dir, "tb")))
  return messages


def table_rows(study, trials, metric: str, fields: list[str]) -> list[list]:
  """One row per trial: the best first by the study's direction, trials without a value last.
  A pruned trial's value is its last reported one."""
  sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0

  def order(t):
    value = t.value if t.values else None
    return (value is None or not math.isfinite(value), sign * (value or 0.0), t.number)

  rows = []
  for t in sorted(trials, key=order):
    state = t.state.name.lower()
    if t.user_attrs.get("retried"):
      state += " (retried)"
    if "retry_of" in t.user_attrs:
      state += f" (retry of {t.user_attrs['retry_of']})"
    value = t.value if t.values else None
    rows.append(
      [t.number, *(t.params.get(f, "") for f in fields), "" if value is None else value]
      + [state, t.user_attrs.get("steps", ""), t.user_attrs.get("wall_s", "")]
      + [t.user_attrs.get("error", "")]
    )
  return rows


def markdown_table(header: list[str], rows: list[list]) -> str:
  def cell(v) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|")

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_plots(study: optuna.Study, metric: str, study_dir: str) -> list[str]:
  """The PNGs that the finished trials allow, and a line for each that they do not."""
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  messages = []
  for name, plot in PLOTS.items():
    path = os.path.join(study_dir, name)
    if len(complete) < 2:
      messages.append(
        f"{name}: not plotted: needs 2 complete trials, the study has {len(complete)}"
      )
      with contextlib.suppress(FileNotFoundError):  # another worker's report may remove it too
        os.remove(path)
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      ax = plot(study, target_name=metric)
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    _replace(path, functools.partial(figure.savefig, format="png", dpi=100), binary=True)
    plt.close(figure)
    messages.append(f"{name}: {path}")
  return messages


def write_hparams(trials, metric: str, fields: list[str], directory: str) -> str:
  """One HParams session per trial with a value, DIRECTORY/trial_NNNN. A finished trial's
  session never changes, so each is written once: into a temporary directory, then renamed
  into place unless another worker's report already put it there."""
  written = 0
  for t in trials:
    if not t.values or not math.isfinite(t.value):
      continue
    written += 1
    name = f"trial_{t.number:04d}"
    if os.path.isdir(os.path.join(directory, name)):
      continue
    hparams = {f: t.params[f] for f in fields if f in t.params}
    hparams["state"] = t.state.name.lower()
    steps = {"steps": float(t.user_attrs.get("steps", 0))}
    temporary = _temporary(directory)
    try:
      with SummaryWriter(temporary) as writer:
        writer.add_hparams(hparams, {metric: t.value, **steps}, name=name)
      os.makedirs(directory, exist_ok=True)
      os.rename(os.path.join(temporary, name), os.path.join(directory, name))
    except OSError:  # written meanwhile by another worker's report
      if not os.path.isdir(os.path.join(directory, name)):
        raise
    finally:
      shutil.rmtree(temporary, ignore_errors=True)
  return f"TensorBoard HParams: {written} trials in {directory} (tensorboard --logdir {directory})"


def _csv(f, header, rows) -> None:
  w = csv.writer(f)
  w.writerow(header)
  w.writerows(rows)


def _replace(path: str, write, binary: bool = False) -> None:
  """Written to a temporary file then renamed: workers finishing together, on any hosts, never
  mix files."""
  temporary = _temporary(path)
  with open(temporary, "wb" if binary else "w", newline=None if binary else "") as f:
    write(f)
  os.replace(temporary, path)


def _temporary(path: str) -> str:
  """A temporary name beside `path` that no other process, on any host, uses."""
  return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
