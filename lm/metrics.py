"""Console lines, metrics.jsonl and TensorBoard for one run directory; FLOPs and MFU."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import classify_metrics, paths, trees


def _import_summary_writer():
  """tensorboardX's SummaryWriter without importing torch: tensorboardX imports torch, where
  it is installed, only to accept torch tensors (3.5 s of CPU at every start); zerolm writes
  numpy. A later `import torch` in the process works as usual."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()

# Dense bfloat16 matmul peak per chip, FLOP/s (vendor figures), by a substring of device_kind.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "A100": 312e12,
  "H100": 989e12,
  "H200": 989e12,
}


class _JsonLines:
  """An appended JSON-lines file. Object stores (gs://) cannot append: there the file is
  rewritten whole, at most every REWRITE_SECONDS and at close."""

  REWRITE_SECONDS = 30.0

  def __init__(self, path):
    self.path, self.remote = path, paths.is_url(path)
    if self.remote:
      self.lines = path.read_text().splitlines() if path.exists() else []
      self.written = time.monotonic()
    else:
      self.file = path.open("a")

  def append(self, line: str) -> None:
    if not self.remote:
      self.file.write(line + "\n")
      self.file.flush()
      return
    self.lines.append(line)
    if time.monotonic() - self.written > self.REWRITE_SECONDS:
      self._rewrite()

  def _rewrite(self) -> None:
    self.path.write_text("".join(line + "\n" for line in self.lines))
    self.written = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self._rewrite()
    else:
      self.file.close()


class Logger:
  """Writes WORKDIR/config.json, WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tb/.

  Only process 0 writes; every process may call it.
  """

  def __init__(self, workdir: str, cfg):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    if not self.active:
      return
    directory = paths.resolve(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    self.write_config(cfg)
    self.jsonl = _JsonLines(directory / "metrics.jsonl")
    self.tb = SummaryWriter(os.fspath(directory / "tb"))

  def write_config(self, cfg) -> None:
    """WORKDIR/config.json: the run's config (again once the data resolves fields of it)."""
    if self.active:
      (paths.resolve(self.workdir) / "config.json").write_text(cfg.to_json_best_effort(indent=2))

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
    self.jsonl.append(json.dumps({"step": step, **values}))
    self.tensorboard(step, {k: v for k, v in values.items() if isinstance(v, float)})
    matrices = {k: v for k, v in values.items() if isinstance(v, list)}  # confusion matrices
    for k, matrix in matrices.items():
      self.tb.add_image(k, classify_metrics.image(np.asarray(matrix)), step, dataformats="HWC")
    shown = "  ".join(
      f"{k} {_fmt(v)}" for k, v in values.items() if k != "eta" and k not in matrices
    )
    eta = f"  eta {values['eta']}" if "eta" in values else ""
    self.info(f"step {step:>6}  {shown}{eta}")

  def tensorboard(self, step: int, values: dict[str, float]) -> None:
    """Scalars for TensorBoard (alone: start-up facts such as communication per step)."""
    if self.active:
      for k, v in values.items():
        self.tb.add_scalar(k, float(v), step)

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
  """Averages step metrics over a logging interval; tokens/s, MFU and ETA from wall time.

  `flops_per_step` (model FLOPs of one global step) over `peak_flops` (all devices' peak)
  gives the model FLOPs utilization; leave either 0 to omit it."""

  def __init__(self, total_steps: int, flops_per_step: float = 0.0, peak_flops: float = 0.0):
    self.total_steps = total_steps
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
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
    mfu = {}
    if self.flops_per_step and self.peak_flops:
      mfu["mfu"] = self.flops_per_step / seconds_per_step / self.peak_flops
    return {
      "loss": float(np.mean([m["loss"] for m in interval])),
      "accuracy": float(np.mean([m["accuracy"] for m in interval])),
      "learning_rate": float(interval[-1]["learning_rate"]),
      "grad_norm": float(interval[-1]["grad_norm"]),
      "tokens_per_second": tokens / max(elapsed, 1e-9),
      "seconds_per_step": seconds_per_step,
      "input_wait_fraction": input_fraction,
      **mfu,
      "eta": f"{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}",
    }


@contextlib.contextmanager
def counting_compiles():
  """Yields a list that gets one entry (seconds) per XLA backend compile inside the block."""
  compiles = []

  def count(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


def matmul_peak_flops(n: int = 1024, repeats: int = 10) -> float:
  """Measured FLOP/s of a float32 [n, n] matmul on one device: the roof where no table has one."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x * 1e-3)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    a = f(a)
  a.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def device_peak_flops(device: jax.Device) -> tuple[float, str]:
  """The device's bfloat16 matmul peak from PEAK_FLOPS, measured (float32) where it has none;
  and where the figure comes from, for the start-up line."""
  kind = device.device_kind.lower()
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind:
      return peak, f"the published bfloat16 peak of a {name}, {peak / 1e12:g} TFLOP/s per device"
  peak = matmul_peak_flops()
  return peak, (
    f"no published peak for device kind {device.device_kind!r}: a measured float32 1024x1024 "
    f"matmul, {peak / 1e9:.6g} GFLOP/s per device"
  )


def matmul_param_count(params) -> int:
  """Parameters used in matmuls: all but norms and biases (optim's no-decay set) and the
  position table, which is only gathered."""
  counted = {k: v for k, v in params.items() if k != "pos_table"}
  sizes = jax.tree.map(
    lambda x, use: int(np.prod(x.shape)) * use, counted, trees.decay_mask(counted)
  )
  return sum(jax.tree.leaves(sizes))


def model_flops(cfg, params) -> float:
  """Analytic training FLOPs of one global step: 6 x matmul params x tokens + attention scores."""
  m, rows, length = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len
  tokens = rows * length
  d = m.num_heads * (m.head_dim or m.d_model // m.num_heads)
  if cfg.task == "translation":  # encoder self-, decoder self- and cross-attention
    attention_layers = m.enc_layers + 2 * m.dec_layers
  elif cfg.task == "classify":  # one body
    attention_layers = m.enc_layers if m.classifier_body == "encoder" else m.dec_layers
  else:
    attention_layers = m.dec_layers
  scores = attention_layers * 2 * 2 * rows * length * length * d  # QK^T and AV, forward
  if cfg.task == "classify":  # the embedding is only gathered (no logits over the vocabulary)
    params = {k: v for k, v in params.items() if k != "embed"}
  return 6.0 * matmul_param_count(params) * tokens + 3.0 * scores
