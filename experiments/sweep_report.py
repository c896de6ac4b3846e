"""A sweep's results in STUDY_DIR: results.md and results.csv (trials sorted by the metric),
PNG plots by optuna.visualization.matplotlib, and TensorBoard HParams under tb/."""

from __future__ import annotations

import csv
import functools
import math
import os
import shutil
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
      if os.path.exists(path):
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
  """One HParams session per trial with a value (rewritten whole: a rerun adds no duplicates)."""
  shutil.rmtree(directory, ignore_errors=True)
  written = 0
  with SummaryWriter(directory) as writer:
    for t in trials:
      if not t.values or not math.isfinite(t.value):
        continue
      hparams = {f: t.params[f] for f in fields if f in t.params}
      hparams["state"] = t.state.name.lower()
      steps = {"steps": float(t.user_attrs.get("steps", 0))}
      writer.add_hparams(hparams, {metric: t.value, **steps}, name=f"trial_{t.number:04d}")
      written += 1
  return f"TensorBoard HParams: {written} trials in {directory} (tensorboard --logdir {directory})"


def _csv(f, header, rows) -> None:
  w = csv.writer(f)
  w.writerow(header)
  w.writerows(rows)


def _replace(path: str, write, binary: bool = False) -> None:
  """Written to a temporary file then renamed: workers finishing together never mix files."""
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "wb" if binary else "w", newline=None if binary else "") as f:
    write(f)
  os.replace(temporary, path)
