"""The training loop: restore or init, then step, log, evaluate, save, until done or stopped.

What the loop runs (the sharded state, the jitted step) is built in `lm.train_step` on the
layout every mode shares (`lm.layout`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from lm import checkpoint, evaluate, inference, metrics
from lm import config as lmc
from lm.data import pipeline
from lm.objective import Teacher
from lm.parallel import report, sharding
from lm.train_step import Trainer, TrainState
from lm.trees import param_count, select

MAX_STEPS_IN_FLIGHT = 2  # dispatched ahead of the devices; bounds the wait after a stop signal


class TrainingHalted(RuntimeError):
  """train.on_nan=halt met a non-finite loss or gradient norm."""


class StopSignals:
  """SIGTERM / SIGINT: the first asks the loop to save and stop; a second exits at once.

  Several processes must stop after the same step (saving is collective). There SIGTERM goes to
  JAX's preemption sync, whose handler jax.distributed.initialize installs: a SIGTERM to any
  process makes every process reach one agreed sync step, with no per-step collective. SIGINT
  is passed on to it as a SIGTERM.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {}
    self._several = jax.process_count() > 1

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      os._exit(128 + signum)
    self.received = signum
    if self._several:
      os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
      ours = (signal.SIGINT,) if self._several else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._handle) for s in ours}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def interrupting(self) -> bool:
    """Whether a phase between steps (an evaluation) should end now: a signal received by a
    single process. Several processes cannot leave a collective phase apart: a signal during
    an evaluation stops them after it (at the next step's sync point); the step was saved
    before the evaluation, except with checkpoint.best_metric, whose save needs its metrics."""
    return not self._several and self.received is not None

  def stop_after(self, step: int) -> int | None:
    """The signal that stops the run after this step, if any."""
    if self._several:
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received


def train(cfg: ml_collections.ConfigDict, workdir: str, overridden=()) -> dict:
  """The training loop, resumed from the workdir's latest checkpoint if there is one, else
  started from train.init_from's parameters or from scratch.

  `overridden`: config fields set on the command line ("model.d_model"), which init_from must
  not see changed. Returns the final evaluation metrics, or {"stopped_at": step} after a stop
  signal.
  """
  lmc.validate(cfg)
  if cfg.model.quantize:
    raise lmc.ConfigError("config.model.quantize: int8 weights are for inference; train in float")
  if cfg.train.init_from:
    source = inference.source_meta(cfg.train.init_from)
    source_cfg = checkpoint.meta_config(source)
    if source_cfg.model.quantize:
      raise lmc.ConfigError(
        f"config.train.init_from: {cfg.train.init_from!r} holds int8 weights; start from a "
        "float export or checkpoint"
      )
    cfg = lmc.adopt_model(cfg, source_cfg, overridden)
    tokenizer = checkpoint.meta_tokenizer(source)
  else:
    tokenizer = None  # data.tokenizer, or the workdir's (trained on the data if absent)
  log = metrics.Logger(workdir, cfg)
  data = pipeline.load(cfg, workdir, log.info, tokenizer)
  if data.cfg is not cfg:  # task=classify: with its labels and class count, as the checkpoint
    cfg = data.cfg
    log.write_config(cfg)
  trainer = Trainer.build(
    cfg, tokenizer_size=data.tokenizer.vocab_size, teacher=load_teacher(cfg, data, log)
  )
  describe(trainer, log)
  batches = pipeline.TrainIterator(data)
  checkpoints = checkpoint.Checkpointer(workdir, cfg)
  try:
    state = restore_or_init(trainer, checkpoints, batches, log)
    started = time.time()
    step_fn = trainer.compile_train_step()
    sync_fn = trainer.compile_sync_step() if trainer.replica_count else None
    log.info(f"train step compiled in {time.time() - started:.1f}s")
    describe_communication(trainer, step_fn, log)
    if sync_fn:
      describe_communication(trainer, sync_fn, log, "local SGD sync")
    return _loop(trainer, state, step_fn, sync_fn, data, batches, checkpoints, log)
  finally:
    checkpoints.close()
    batches.close()
    data.close()
    log.close()


def load_teacher(cfg, data: pipeline.Data, log) -> Teacher | None:
  """train.teacher's layout and parameters on this run's mesh and stage; None if there is none
  (or train.distill_weight is 0: plain training, the teacher never loaded)."""
  if not (cfg.train.teacher and cfg.train.distill_weight > 0):
    return None
  layout, params, tokenizer, step = inference.restore_model(cfg.train.teacher, cfg, "train.teacher")
  taught = layout.cfg
  if taught.task != cfg.task or (cfg.task == "classify" and taught.data.labels != cfg.data.labels):
    what = f"task {taught.task!r}" + (
      f", classes {taught.data.labels!r}" if taught.task == "classify" else ""
    )
    mine = f"task {cfg.task!r}" + (
      f", classes {cfg.data.labels!r}" if cfg.task == "classify" else ""
    )
    raise lmc.ConfigError(
      f"config.train.teacher: it is a {what} model, this run {mine}; a teacher must predict "
      "what the student predicts"
    )
  if tokenizer.fingerprint() != data.tokenizer.fingerprint():
    raise lmc.ConfigError(
      f"config.train.teacher: its tokenizer ({tokenizer.vocab_size} pieces) is not this run's "
      f"({data.tokenizer.vocab_size}); a teacher must share the student's token ids"
    )
  log.info(
    f"teacher: {cfg.train.teacher} (step {step}), "
    f"{param_count(layout.abstract_params) / 1e6:.2f}M "
    f"params, frozen; loss = {1 - cfg.train.distill_weight:g} x cross-entropy + "
    f"{cfg.train.distill_weight:g} x T^2 KL, T = {cfg.train.distill_temperature:g}"
  )
  return Teacher(layout, params)


def describe(trainer: Trainer, log) -> None:
  """Start-up lines: mesh, stage, size, vocab padding, and any tensor ZeRO cannot shard."""
  layout = trainer.layout
  cfg, dims = layout.cfg, layout.dims
  log.info(
    f"mesh {dict(layout.mesh.shape)}, zero_stage {cfg.zero_stage}, "
    f"{param_count(layout.abstract_params) / 1e6:.2f}M params "
    f"({param_count(select(layout.abstract_params, trainer.trainable)) / 1e6:.2f}M trainable), "
    f"{dims.vocab_size} embedding rows "
    f"for {layout.vocab_limit} token ids (the rest: padding for the mesh, never predicted), "
    f"dtype {dims.dtype.name}, remat {dims.remat}"
  )
  for line in layout.notes():
    log.info(line)
  smoothing = cfg.model.label_smoothing
  per = "per example (tokens count examples)" if cfg.task == "classify" else "per target token"
  log.info(
    "loss: the training cross-entropy"
    + (f" with label smoothing {smoothing:g}" if smoothing else "")
    + f"; eval_loss: the plain negative log-likelihood {per}"
    + ("" if cfg.task == "classify" else " (eval_perplexity = exp(eval_loss))")
  )
  if cfg.zero_stage:
    whole = sharding.replicated_over_fsdp(layout.logical, layout.abstract_params, layout.mesh)
    for path, (shape, nbytes) in whole.items():
      log.info(
        f"zero_stage {cfg.zero_stage}: {path} {list(shape)} has no dimension that fsdp="
        f"{layout.mesh.shape['fsdp']} divides; kept whole on every fsdp device ({nbytes} bytes)"
      )


def describe_communication(trainer: Trainer, compiled, log, what: str = "step") -> None:
  """One line per collective kind of a compiled step: bytes per device per call, as the
  bandwidth model of lm.parallel.report counts them (loops counted per iteration)."""
  traffic = report.collective_traffic(compiled.as_text(), dict(trainer.layout.mesh.shape))
  prefix = "" if what == "step" else f"{what} "
  for kind, t in traffic.items():
    if t["count"]:
      over = ", ".join(f"{axes or 'none'} {b / 2**20:.2f}" for axes, b in t["by_axes"].items())
      log.info(
        f"{prefix}{kind}: {t['bandwidth_bytes'] / 2**20:.2f} MB per device per {what} "
        f"({t['count']} ops; MB by mesh axes: {over})"
      )
  tag = "communication" if what == "step" else "communication_sync"
  log.tensorboard(0, {f"{tag}/{k}_bytes": t["bandwidth_bytes"] for k, t in traffic.items()})


def restore_or_init(
  trainer: Trainer, checkpoints: checkpoint.Checkpointer, batches, log
) -> TrainState:
  """The newest readable checkpoint (state and data position) if there is one, else a fresh
  state."""
  step, state = checkpoints.restore_newest(
    lambda step: checkpoints.restore(step, trainer.abstract_state(), batches), log.info
  )
  cfg = trainer.layout.cfg
  if step is None and cfg.train.init_from:
    source = cfg.train.init_from
    _, params, _, source_step = inference.restore_model(source, cfg, "train.init_from")
    # A classifier takes a translation model's encoder or an LM's stack: the parts it has.
    params = {k: v for k, v in params.items() if k in trainer.layout.abstract_params}
    log.info(f"initialized from {source} (its step {source_step}); training starts at step 0")
    return trainer.init_state(params)
  if step is None:
    return trainer.init_state()
  log.info(f"resumed from step {step} ({checkpoints.path(step)})")
  return trainer.in_memory_order(state)


def _loop(trainer, state, step_fn, sync_fn, data, batches, checkpoints, log) -> dict:
  layout = trainer.layout
  cfg = layout.cfg
  total = cfg.train.total_steps
  peak, peak_source = metrics.device_peak_flops(layout.mesh.devices.flat[0])
  log.info(f"mfu: against {peak_source}")
  peak *= layout.mesh.size
  meter = metrics.Throughput(total, metrics.model_flops(cfg, layout.abstract_params), peak)
  pending, last_good = [], checkpoints.latest_step()
  with StopSignals() as stop:
    evaluator = evaluate.Evaluator(layout, data, log, stop.interrupting)
    try:
      if cfg.train.init_from and int(state.step) == 0:  # the starting point, on this run's data
        log.scalars(0, evaluator(state.params))
      if int(state.step) >= total:  # resumed at the end: only the evaluation is left
        results = evaluator(state.params)
        log.scalars(total, results)
        return results
    except evaluate.Interrupted:  # nothing trained since the last checkpoint: nothing to save
      log.info(f"{signal.Signals(stop.received).name}: stopped before training")
      return {"stopped_at": int(state.step)}
    for step in range(int(state.step) + 1, total + 1):
      with meter.waiting_for_input():
        batch = next(batches)
      state, step_metrics = step_fn(state, layout.shard_batch(batch))
      if sync_fn and (step % cfg.train.sync_every == 0 or step == total):
        state = sync_fn(state)  # local SGD: the replicas merge (a fixed schedule: resumable)
      pending.append(step_metrics)
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
      if cfg.train.on_nan == "halt" and not bool(step_metrics["finite"]):
        checkpoints.wait()
        raise TrainingHalted(
          f"step {step}: non-finite loss or gradient norm (train.on_nan=halt); the latest "
          f"checkpoint is the last good one: step {last_good} in {checkpoints.directory}"
        )
      if step % cfg.train.log_every == 0 or step == total:
        summary = meter.summarize(step, jax.device_get(pending))
        summary["skipped_examples"] = data.skipped_at_load + batches.skipped
        summary["skipped_steps"] = int(state.skipped_steps)
        log.scalars(step, summary)
        pending = []
      final = step == total
      evaluating = final or bool(cfg.eval.every and step % cfg.eval.every == 0)
      stopping = None if final else stop.stop_after(step)
      # Saved before the evaluation (which may decode for minutes), so a stop during it loses
      # nothing; only checkpoint.best_metric needs the step's metrics in its save.
      with_metrics = evaluating and bool(cfg.checkpoint.best_metric) and not stopping
      due = final or stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
      saved = due and not with_metrics
      if saved:
        checkpoints.save(step, trainer.in_layer_order(state), batches, data.tokenizer)
        last_good = step
      if evaluating and not stopping:
        try:
          evaluated = evaluator(state.params)
        except evaluate.Interrupted:
          stopping, evaluated = stop.received, None
        if evaluated:
          log.scalars(step, evaluated)
        if (with_metrics or stopping) and not saved:
          checkpoints.save(step, trainer.in_layer_order(state), batches, data.tokenizer, evaluated)
          last_good = step
      if stopping:
        checkpoints.wait()
        name = signal.Signals(stopping).name
        log.info(f"{name}: stopped after step {step}; checkpoint {checkpoints.path(step)} saved")
        return {"stopped_at": step}
  checkpoints.wait()
  return evaluated  # the final step's
