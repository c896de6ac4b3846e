"""Console lines, metrics.jsonl and TensorBoard for one run directory."""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter


class Logger:
  """Writes WORKDIR/config.json, WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tb/.

  Only process 0 writes; every process may call it.
  """

  def __init__(self, workdir: str, cfg):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def info(self, message: str) -> None:
    if self.active:
      print(message, flush=True)

  def scalars(self, step: int, values: dict) -> None:
    if not self.active:
      return
    values = {
      k: float(v) if isinstance(v, (int, float, np.number, np.ndarray)) else v
      for k, v in values.items()
    }
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      if isinstance(v, float):
        self.tb.add_scalar(k, v, step)
    shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items() if k != "eta")
    eta = f"  eta {values['eta']}" if "eta" in values else ""
    self.info(f"step {step:>6}  {shown}{eta}")

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tb.close()


class Console:
  """The Logger's console half, for modes that write no run directory."""

  def info(self, message: str) -> None:
    if jax.process_index() == 0:
      print(message, flush=True)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


class Throughput:
  """Averages step metrics over a logging interval; tokens/s and ETA from wall time."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self.last_time = time.time()
    self.input_seconds = 0.0

  @contextlib.contextmanager
  def waiting_for_input(self):
    """Times the wait for the next batch, reported as a fraction of step time."""
    started = time.time()
    yield
    self.input_seconds += time.time() - started

  def summarize(self, step: int, interval: list[dict]) -> dict:
    now = time.time()
    elapsed, self.last_time = now - self.last_time, now
    steps = len(interval)
    tokens = sum(float(m["tokens"]) for m in interval)
    seconds_per_step = elapsed / max(steps, 1)
    eta = int(seconds_per_step * (self.total_steps - step))
    input_fraction, self.input_seconds = self.input_seconds / max(elapsed, 1e-9), 0.0
    return {
      "loss": float(np.mean([m["loss"] for m in interval])),
      "accuracy": float(np.mean([m["accuracy"] for m in interval])),
      "learning_rate": float(interval[-1]["learning_rate"]),
      "grad_norm": float(interval[-1]["grad_norm"]),
      "tokens_per_second": tokens / max(elapsed, 1e-9),
      "seconds_per_step": seconds_per_step,
      "input_wait_fraction": input_fraction,
      "eta": f"{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}",
    }
