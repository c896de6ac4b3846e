"""Checkpoints on orbax: train state + data-iterator state + config + tokenizer, saved async.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. orbax writes each step into a temporary
directory and renames it when every item is committed, so a step directory that exists is
whole; a killed save leaves only a temporary directory, which is never restored and is cleaned
up on the next start. `state` restores into any abstract target (a tree of ShapeDtypeStructs
with shardings): another mesh or ZeRO stage reads just its own shards. `data` holds one JSON
file per process (grain's handler) with its lanes' positions; a restore reads them all, so any
process count resumes the same global order.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy

from lm import config as lmc
from lm.data import pipeline
from lm.data import tokenizer as tok
from lm.models import layers
from lm.state import Run

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # damaged steps are moved here, never deleted
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")


def _meta(cfg: ml_collections.ConfigDict, tokenizer: tok.Tokenizer) -> dict:
  return {
    "config": json.loads(cfg.to_json_best_effort()),
    "tokenizer": base64.b64encode(tokenizer.model_proto).decode("ascii"),
  }


def meta_config(meta: dict) -> ml_collections.ConfigDict:
  """The saved config over today's defaults: a checkpoint written before a field existed loads
  with that field's default."""
  saved = meta["config"]
  cfg = lmc.lm_defaults() if saved.get("task") == "lm" else lmc.translation_defaults()
  cfg.update(saved)
  return cfg


def meta_tokenizer(meta: dict) -> tok.Tokenizer:
  return tok.Tokenizer(base64.b64decode(meta["tokenizer"]))


class _IteratorItem:
  """What grain's orbax handler expects of a non-grain iterator: bytes state, start_prefetch."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler, restoring from every process's file: a run saved by P processes resumes
  on any number (the pipeline keeps its state per lane, see pipeline.TrainIterator)."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    states = [json.loads(f.read_text()) for f in sorted(directory.glob("process_*-of-*.json"))]
    if not states:
      raise FileNotFoundError(f"no data state in {directory}")
    own_state = json.loads(own.read_text()) if own.exists() else None
    item.set_state(json.dumps(pipeline.merge_states(states, own_state)).encode())
    return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """One run's CheckpointManager: periodic async saves, the latest `keep`, optionally the best."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict | None = None):
    """With no config: read-only use (restore, export) that keeps whatever is there."""
    c = cfg.checkpoint if cfg is not None else ml_collections.ConfigDict({"best_metric": ""})
    policies = [keep_policy.LatestN(n=c.keep if cfg is not None else None)]
    if c.best_metric:
      policies.append(
        keep_policy.BestN(
          get_metric_fn=lambda metrics: metrics[c.best_metric],
          reverse=c.best_metric in LOWER_IS_BETTER,
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=keep_policy.AnyPreservationPolicy(policies),
      cleanup_tmp_directories=cfg is not None,  # a reader leaves a writer's files alone
      enable_async_checkpointing=True,
    )
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": _DataHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )
    self.cfg = cfg

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state, iterator, tokenizer, metrics: dict | None = None) -> None:
    """Starts an async save; the previous one is finished first (orbax does that)."""
    meta = {**_meta(self.cfg, tokenizer), "fingerprints": fingerprints(state)}
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=_DataSave(_IteratorItem(iterator)),
        meta=ocp.args.JsonSave(meta),
      ),
      metrics=metrics,
      force=True,
    )

  def restore_newest(self, restore_step: Callable[[int], Any], log=print) -> tuple[int | None, Any]:
    """(step, restore_step(step)) for the newest step that reads whole; (None, None) if there
    is no checkpoint.

    A damaged step (a flipped byte, a truncated or missing file) is reported in one line and the
    one before is tried (a training run with checkpoint.on_corrupt=fail stops with a one-line
    error instead); every process must read the same step. A writer moves the damaged
    steps aside to UNREADABLE_DIR, so that later saves can reuse their numbers. Raises
    ConfigError if no step reads.
    """
    if sys.unraisablehook is not _quiet_failed_reads:
      global _reporter
      _reporter, sys.unraisablehook = sys.unraisablehook, _quiet_failed_reads
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        result, reason = restore_step(step), None
      except Exception as e:  # TensorStore, orbax and JSON raise many kinds for damaged files
        result, reason = None, _brief(e)
      if reason is not None:
        _drop_failed_reads()  # after the except block: nothing refers to the failed reads now
      if _on_every_process(reason is None):
        self._set_aside(damaged)
        return step, result
      reason = reason or "unreadable on another process"
      if self.cfg is not None and self.cfg.checkpoint.on_corrupt == "fail":
        raise lmc.ConfigError(
          f"--workdir: checkpoint {self.path(step)} is unreadable ({reason}); move it away to "
          "resume from the one before, or set checkpoint.on_corrupt=fallback"
        )
      log(f"checkpoint {self.path(step)} is unreadable ({reason}); trying the one before")
      damaged.append(step)
    if steps:
      raise lmc.ConfigError(
        f"--workdir: none of the {len(steps)} checkpoints in {self.directory} reads whole; "
        "see the lines above, or start a new workdir"
      )
    return None, None

  def _set_aside(self, steps: list[int]) -> None:
    if not steps or self.cfg is None:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        os.replace(self.path(step), os.path.join(aside, f"{step}-{time.time():.0f}"))
    _on_every_process(True)  # a barrier: no process saves before the move is done
    self.manager.reload()

  def restore(self, step: int, abstract_state, iterator=None) -> Any:
    """The state at `step` laid out as `abstract_state` says; an iterator is set in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = _DataRestore(_IteratorItem(iterator))
    state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
    saved = self.meta(step).get("fingerprints")
    if saved is not None:  # checkpoints from before fingerprints have none
      for path, value in fingerprints(state).items():
        expected = str(saved.get(path, value))  # an array added since: nothing to check
        dtype = value.split(":")[0]
        if ":" not in expected:  # written before fingerprints named the dtype
          expected = f"{dtype}:{expected}"
        if expected.split(":")[0] == dtype and expected != value:
          raise DamagedCheckpoint(f"state{path} differs from what was saved (fingerprint)")
    return state

  def meta(self, step: int) -> dict:
    return load_meta(self.path(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


class DamagedCheckpoint(Exception):
  """An array restored with other contents than were saved."""


def fingerprints(tree) -> dict[str, str]:
  """Per array, "dtype:sum" with the sum of its elements' bit patterns mod 2**32.

  orbax checksums only a shard's index, not the array bytes: a flipped byte in a chunk restores
  silently as other numbers. A sum is independent of the layout, so a restore onto another mesh
  checks against the same values, and any one damaged element changes it. A restore into
  another dtype (a cast) is not checked: its bits differ by design.
  """
  sums = _bit_sums(tree)
  return {
    jax.tree_util.keystr(path): f"{leaf.dtype}:{int(np.asarray(x.addressable_data(0)))}"
    for (path, x), leaf in zip(
      jax.tree_util.tree_leaves_with_path(sums), jax.tree.leaves(tree), strict=True
    )
  }


@jax.jit
def _bit_sums(tree):
  def bit_sum(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

  return jax.tree.map(bit_sum, tree)


def _drop_failed_reads() -> None:
  """A damaged step fails orbax's concurrent array reads; the first error is reported, and the
  others would print a traceback each ("Future exception was never retrieved") when collected."""
  asyncio_log = logging.getLogger("asyncio")
  level = asyncio_log.level
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    gc.collect()
  finally:
    asyncio_log.setLevel(level)


_reporter = sys.__unraisablehook__


def _quiet_failed_reads(unraisable) -> None:
  """The rest of a failed read, reported from TensorStore's threads whenever they finish (during
  the restore, or seconds later): a result sent to the read's closed event loop, or a read
  coroutine closed mid-read. The failure itself has been reported in one line."""
  error = unraisable.exc_value
  closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  code = getattr(unraisable.object, "cr_code", None)
  closed_read = isinstance(error.__cause__, GeneratorExit) and "orbax" in str(
    getattr(code, "co_filename", "")
  )
  if not (closed_loop or closed_read):
    _reporter(unraisable)


def _brief(error: Exception) -> str:
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0][:160]}"


def _on_every_process(ok: bool) -> bool:
  """True where `ok` holds on every process (a collective under several processes)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


def write_export(
  directory: str, params, cfg, tokenizer: tok.Tokenizer, dtype: str = "float32", step: int = 0
) -> None:
  """Parameters only (optionally cast), with the config, tokenizer and training step: what
  decoding and serving load."""
  if dtype != "float32":
    params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == np.float32 else x, params)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      os.path.abspath(directory),
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({**_meta(cfg, tokenizer), "step": step}),
      ),
      force=True,
    )


def load_meta(directory: str) -> dict:
  """The config and tokenizer of an export (or of one checkpoint step's directory)."""
  with open(os.path.join(directory, "meta", "metadata")) as f:
    return json.load(f)


def load_export(directory: str, abstract_params) -> Any:
  """Parameters of an export, laid out (and cast) as `abstract_params` says."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
      os.path.abspath(directory),
      args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)),
    )
  return restored.params


def _inference_config(meta: dict, layout) -> ml_collections.ConfigDict:
  """The saved config on `layout`'s mesh and ZeRO stage, or (None) fsdp over every device."""
  cfg = meta_config(meta)
  if layout is None:
    cfg.mesh.update(data=1, fsdp=-1, tensor=1, dcn_data=1)
  else:
    cfg.mesh.update(layout.mesh.to_dict())
    cfg.zero_stage = layout.zero_stage
  return cfg


def restore_latest(workdir: str, devices=None, layout=None) -> tuple[Run, Any, tok.Tokenizer, int]:
  """(run, params, tokenizer, step) of the workdir's latest checkpoint, for inference.

  The model comes from the checkpoint's own config; the mesh fills the given devices, as fsdp
  or as `layout` (a config) says.
  """
  checkpoints = Checkpointer(workdir)

  def read(step):
    meta = checkpoints.meta(step)
    cfg, tokenizer = _inference_config(meta, layout), meta_tokenizer(meta)
    run = Run.build(cfg, devices, tokenizer_size=tokenizer.vocab_size)
    return run, checkpoints.restore(step, run.abstract_state()).params, tokenizer

  try:
    step, restored = checkpoints.restore_newest(read, log=lambda line: print(line, file=sys.stderr))
  finally:  # also on errors: an open manager's threads print a traceback at exit
    checkpoints.close()
  if step is None:
    raise lmc.ConfigError(f"--workdir: no checkpoint in {checkpoints.directory}; train first")
  run, params, tokenizer = restored
  return run, params, tokenizer, step


def source_meta(path: str, field: str = "train.init_from") -> dict:
  """The meta (config, tokenizer, step) of a trained model given as an export or a workdir (its
  latest checkpoint)."""
  if _is_export(path):
    return load_meta(path)
  checkpoints = Checkpointer(path) if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) else None
  try:
    step = checkpoints.latest_step() if checkpoints else None
    if step is None:
      raise lmc.ConfigError(
        f"config.{field}: {path!r} is neither an export nor a workdir with a checkpoint"
      )
    return {**checkpoints.meta(step), "step": step}
  finally:
    if checkpoints:
      checkpoints.close()


def restore_for_inference(
  workdir: str, export: str | None = None, devices=None, layout=None
) -> tuple[Run, Any, tok.Tokenizer, int]:
  """An export if one is named, else the workdir's latest checkpoint (see restore_latest)."""
  if export:
    return restore_export(export, devices, layout)
  return restore_latest(workdir, devices, layout)


def restore_model(
  path: str, layout, field: str, devices=None
) -> tuple[Run, Any, tok.Tokenizer, int]:
  """(run, params, tokenizer, step) of an export or a workdir's latest checkpoint (the model
  named by config field `field`), laid out on `layout`'s mesh and ZeRO stage."""
  source_meta(path, field)  # a clear error for a path that holds no model
  return restore_for_inference(path, path if _is_export(path) else None, devices, layout)


def _is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "meta", "metadata"))


def export(workdir: str, output: str, dtype: str = "float32", merge_lora: bool = False) -> int:
  """Writes the latest checkpoint's parameters (+ config, tokenizer) to `output`; its step.
  `merge_lora`: LoRA's updates folded into the kernels, the export a model without LoRA.
  dtype "int8": matmul kernels as int8 with per-channel scales (model.quantize)."""
  run, params, tokenizer, step = restore_latest(workdir)
  cfg = run.cfg
  if merge_lora:
    m = cfg.model
    if not m.lora_rank:
      raise lmc.ConfigError(f"--merge_lora: {workdir!r} has no LoRA (model.lora_rank is 0)")
    with jax.set_mesh(run.mesh):
      params = jax.jit(lambda p: layers.merge_lora(p, m.lora_alpha / m.lora_rank))(params)
    cfg = cfg.copy_and_resolve_references()
    cfg.model.lora_rank = 0
  if dtype == "int8":
    with jax.set_mesh(run.mesh):
      params = jax.jit(layers.quantize_int8)(params)
    cfg = cfg.copy_and_resolve_references()
    cfg.model.quantize, dtype = "int8", "float32"  # scales and unquantized tensors stay float
  write_export(output, params, cfg, tokenizer, dtype, step)
  return step


def restore_export(
  directory: str, devices=None, layout=None
) -> tuple[Run, Any, tok.Tokenizer, int]:
  """(run, params, tokenizer, step) of an export, laid out as restore_latest does."""
  if not _is_export(directory):
    raise lmc.ConfigError(f"--export: {directory!r} is not an export (no meta/metadata)")
  meta = load_meta(directory)
  cfg, tokenizer = _inference_config(meta, layout), meta_tokenizer(meta)
  run = Run.build(cfg, devices, tokenizer_size=tokenizer.vocab_size)
  return run, load_export(directory, run.abstract_state().params), tokenizer, meta.get("step", 0)
