"""Training: sharded state, the jitted train step, and the loop.

`Run.build(cfg)` lays model, gradients and optimizer state out on the mesh for the ZeRO
stage; `train_step` is one pure function of (state, batch) jitted with explicit in/out
shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.experimental import multihost_utils

from lm import config as lmc
from lm import optim
from lm.models.loss import cross_entropy_sums
from lm.models.transformer import ModelDims, build_model, logical_names
from lm.parallel import mesh as lm_mesh
from lm.parallel import sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nested dict of arrays, the model's nnx.Param values
  opt_state: Any
  skipped_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient

  @classmethod
  def create(cls, params, opt_state):
    return cls(jnp.zeros((), jnp.int32), params, opt_state, jnp.zeros((), jnp.int32))


@dataclasses.dataclass
class Run:
  """Everything one training run compiles against, derived from the config alone."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  dims: ModelDims
  graphdef: Any
  logical: dict  # logical axis names per parameter
  abstract_params: dict  # ShapeDtypeStructs
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  shardings: sharding.StateShardings
  state_shardings: TrainState

  @classmethod
  def build(cls, cfg: ml_collections.ConfigDict, devices=None, vocab_size: int | None = None):
    """Validates the config against the devices and derives every sharding; compiles nothing."""
    lmc.validate(cfg)
    mesh = lm_mesh.make_mesh(cfg.mesh, devices)
    lm_mesh.check_divisibility(cfg, mesh)
    vocab = lm_mesh.padded_vocab_size(vocab_size or cfg.model.vocab_size, mesh)
    platform = mesh.devices.flat[0].platform
    dims = ModelDims.from_config(cfg.model, vocab_size=vocab, platform=platform)
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: build_model(cfg.task, dims, cfg.seed))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = logical_names(state)
    abstract_params = nnx.to_pure_dict(state)
    lr = optim.schedule(cfg.optim, cfg.train.total_steps)
    tx = optim.optimizer(cfg.optim, cfg.train.total_steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def opt_state_shardings(per_param):
      # Param-shaped subtrees (Adam's m and v) follow the parameter; the rest (counts,
      # factored Adafactor statistics) is small and replicated.
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        per_param,
        transform_non_params=lambda _: replicated,
      )

    shardings = sharding.stage_shardings(
      logical, abstract_params, mesh, cfg.zero_stage, opt_state_shardings
    )
    state_shardings = TrainState(
      step=shardings.replicated,
      params=shardings.params,
      opt_state=shardings.opt_state,
      skipped_steps=shardings.replicated,
    )
    return cls(
      cfg, mesh, dims, graphdef, logical, abstract_params, tx, lr, shardings, state_shardings
    )

  def init_state(self) -> TrainState:
    """Initialized directly into its shardings: no device holds more than its share."""

    def init():
      with nnx.use_eager_sharding(False):
        model = build_model(self.cfg.task, self.dims, self.cfg.seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState.create(params, self.tx.init(params))

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)()

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, split over (data, fsdp)."""
    return {
      k: jax.make_array_from_process_local_data(self.shardings.batch, v)
      for k, v in local_batch.items()
    }

  def loss_sums(self, params, batch, dropout_key):
    """(loss sum, (target tokens, correct tokens)) of one batch."""
    model = nnx.merge(self.graphdef, params)
    logits = model(batch, dropout_key)  # [batch, length, vocab] float32
    weights = (batch["targets"] > 0).astype(jnp.float32)
    loss, tokens, correct = cross_entropy_sums(
      logits, batch["targets"], weights, self.cfg.model.label_smoothing
    )
    return loss, (tokens, correct)

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """Forward, loss, gradient (accumulated over microbatches) and update."""
    k = self.cfg.train.microbatches
    dropout_key = jax.random.fold_in(jax.random.key(self.cfg.seed), state.step)
    grad_fn = jax.value_and_grad(self.loss_sums, has_aux=True)
    batch_spec = self.shardings.batch.spec

    def microbatch(b):  # [B, L] -> [k, B/k, L]: row j*k+i goes to microbatch i; no traffic
      b = b.reshape(b.shape[0] // k, k, *b.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(b, jax.sharding.PartitionSpec(None, *batch_spec))

    def accumulate(carry, scanned):
      grads, loss, tokens, correct = carry
      mb, i = scanned
      (mb_loss, (mb_tokens, mb_correct)), mb_grads = grad_fn(
        state.params, mb, jax.random.fold_in(dropout_key, i)
      )
      # ZeRO-2: each microbatch's gradient is reduce-scattered as soon as it exists.
      grads = jax.lax.with_sharding_constraint(
        jax.tree.map(jnp.add, grads, mb_grads), self.shardings.grads
      )
      return (grads, loss + mb_loss, tokens + mb_tokens, correct + mb_correct), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jax.lax.with_sharding_constraint(zeros, self.shardings.grads), 0.0, 0.0, 0.0)
    scanned = (jax.tree.map(microbatch, batch), jnp.arange(k))
    with sharding.params_sharded_over_fsdp(self.cfg.zero_stage == 3):
      (grads, loss, tokens, correct), _ = jax.lax.scan(accumulate, init, scanned)
    # ZeRO-1: one reduce-scatter per step, to the optimizer state's layout.
    grads = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads), self.shardings.update
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves params and optimizer state as they were.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      (params, opt_state),
      (state.params, state.opt_state),
    )
    metrics = {
      "loss": loss / jnp.maximum(tokens, 1.0),
      "accuracy": correct / jnp.maximum(tokens, 1.0),
      "grad_norm": grad_norm,
      "learning_rate": self.lr_schedule(state.step),
      "tokens": tokens,
      "finite": finite,
    }
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, skipped), metrics

  def jit_train_step(self):
    return jax.jit(
      self.train_step,
      in_shardings=(self.state_shardings, self.shardings.batch),
      out_shardings=(self.state_shardings, self.shardings.replicated),
      donate_argnums=0,
    )

  def abstract_batch(self, global_batch: int | None = None, packed: bool | None = None) -> dict:
    rows = global_batch or self.cfg.train.global_batch_size
    shape = (rows, self.cfg.data.seq_len)
    keys = batch_keys(self.cfg.task, self.cfg.data.pack if packed is None else packed)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.shardings.batch) for k in keys}

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(lambda p: TrainState.create(p, self.tx.init(p)), self.abstract_params)
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      self.state_shardings,
    )

  def compile_train_step(self):
    """The jitted step lowered and compiled once, against abstract inputs."""
    with jax.set_mesh(self.mesh):
      return self.jit_train_step().lower(self.abstract_state(), self.abstract_batch()).compile()


def batch_keys(task: str, packed: bool) -> tuple[str, ...]:
  """The [batch, seq_len] int32 arrays of a training batch."""
  sides = ("targets",) if task == "lm" else ("inputs", "targets")
  if not packed:
    return sides
  return tuple(side + part for side in sides for part in ("", "_segment_ids", "_positions"))


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def model_vocab(cfg, tokenizer) -> int:
  """Rows of the embedding before mesh padding: the config's size or the tokenizer's if larger."""
  return max(cfg.model.vocab_size, tokenizer.vocab_size)


def restore_latest(workdir: str, devices=None):
  """(run, params, tokenizer, step) of the workdir's latest checkpoint, for inference.

  The model comes from the checkpoint's own config; the mesh fills the given devices.
  """
  from lm import checkpoint  # noqa: PLC0415

  checkpoints = checkpoint.Checkpointer(workdir)
  step = checkpoints.latest_step()
  if step is None:
    raise lmc.ConfigError(f"--workdir: no checkpoint in {checkpoints.directory}; train first")
  meta = checkpoints.meta(step)
  cfg, tokenizer = checkpoint.meta_config(meta), checkpoint.meta_tokenizer(meta)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1)
  run = Run.build(cfg, devices, vocab_size=model_vocab(cfg, tokenizer))
  state = checkpoints.restore(step, run.abstract_state())
  checkpoints.close()
  return run, state.params, tokenizer, step


def export(workdir: str, output: str, dtype: str = "float32") -> int:
  """Writes the latest checkpoint's parameters (+ config, tokenizer) to `output`; its step."""
  from lm import checkpoint  # noqa: PLC0415

  run, params, tokenizer, step = restore_latest(workdir)
  checkpoint.export(output, params, run.cfg, tokenizer, dtype)
  return step


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

  def stop_after(self, step: int) -> int | None:
    """The signal that stops the run after this step, if any."""
    if self._several:
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """The training loop, resumed from the workdir's latest checkpoint if there is one.

  Returns the final evaluation metrics, or {"stopped_at": step} after a stop signal.
  """
  from lm import checkpoint, evaluate, metrics  # noqa: PLC0415 (keeps `Run` free of I/O deps)
  from lm.data import pipeline  # noqa: PLC0415

  lmc.validate(cfg)
  log = metrics.Logger(workdir, cfg)
  data = pipeline.load(cfg, workdir, log.info)
  vocab = model_vocab(cfg, data.tokenizer)
  run = Run.build(cfg, vocab_size=vocab)
  if run.dims.vocab_size != vocab:
    log.info(
      f"vocab padded from {vocab} to {run.dims.vocab_size} (a multiple of 128 and mesh.tensor)"
    )
  log.info(
    f"mesh {dict(run.mesh.shape)}, zero_stage {cfg.zero_stage}, "
    f"{param_count(run.abstract_params) / 1e6:.2f}M params, vocab {run.dims.vocab_size}, "
    f"dtype {run.dims.dtype.name}"
  )
  batches = pipeline.TrainIterator(data)
  checkpoints = checkpoint.Checkpointer(workdir, cfg)
  latest = checkpoints.latest_step()
  if latest is None:
    state = run.init_state()
  else:
    state = checkpoints.restore(latest, run.abstract_state(), batches)
    log.info(f"resumed from step {latest} ({checkpoints.path(latest)})")
  started = time.time()
  step_fn = run.compile_train_step()
  log.info(f"train step compiled in {time.time() - started:.1f}s")
  total = cfg.train.total_steps
  meter = metrics.Throughput(total)
  pending, last_good, results = [], latest, {}
  with StopSignals() as stop:
    for step in range(int(state.step) + 1, total + 1):
      with meter.waiting_for_input():
        batch = next(batches)
      state, step_metrics = step_fn(state, run.shard_batch(batch))
      pending.append(step_metrics)
      if cfg.train.on_nan == "halt" and not bool(step_metrics["finite"]):
        checkpoints.wait()
        raise TrainingHalted(
          f"step {step}: non-finite loss or gradient norm (train.on_nan=halt); the latest "
          f"checkpoint is the last good one: step {last_good} in {checkpoints.directory}"
        )
      if step % cfg.train.log_every == 0 or step == total:
        summary = meter.summarize(step, jax.device_get(pending))
        summary["skipped_examples"] = data.skipped_at_load + batches.skipped.value
        summary["skipped_steps"] = int(state.skipped_steps)
        log.scalars(step, summary)
        pending = []
      evaluated = None
      if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
        evaluated = evaluate.evaluate(run, state.params, data, log)
        log.scalars(step, evaluated)
      every = cfg.checkpoint.every
      periodic = (every and step % every == 0) or (evaluated and cfg.checkpoint.best_metric)
      stopping = stop.stop_after(step)
      if (periodic and step != total) or stopping:  # the final save carries the results
        checkpoints.save(step, state, batches, data.tokenizer, evaluated)
        last_good = step
      if stopping:
        checkpoints.wait()
        name = signal.Signals(stopping).name
        log.info(f"{name}: stopped after step {step}; checkpoint {checkpoints.path(step)} saved")
        results = {"stopped_at": step}
        break
    else:
      results = evaluate.evaluate(run, state.params, data, log)
      log.scalars(total, results)
      if checkpoints.latest_step() != total:
        checkpoints.save(total, state, batches, data.tokenizer, results)
      checkpoints.wait()
  checkpoints.close()
  log.close()
  return results
