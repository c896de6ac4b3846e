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

import dataclasses
import gc
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy

from lm import config as lmc
from lm import paths
from lm.data import pipeline
from lm.data import tokenizer as tok
from lm.layout import Layout

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # damaged steps are moved here, never deleted
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")


def meta_of(cfg: ml_collections.ConfigDict, tokenizer: tok.Tokenizer) -> dict:
  return {
    "config": json.loads(cfg.to_json_best_effort()),
    "tokenizer": tokenizer.to_meta(),
  }


def meta_config(meta: dict) -> ml_collections.ConfigDict:
  """The saved config over today's defaults: a checkpoint written before a field existed loads
  with that field's default, and a field removed since (serve.max_beam) is dropped."""
  saved = meta["config"]
  cfg = lmc.lm_defaults() if saved.get("task") == "lm" else lmc.translation_defaults()
  cfg.update(_known_fields(saved, cfg))
  return cfg


def _known_fields(saved: dict, schema) -> dict:
  return {
    key: _known_fields(value, schema[key]) if isinstance(value, dict) else value
    for key, value in saved.items()
    if key in schema
  }


def meta_tokenizer(meta: dict) -> tok.Tokenizer:
  return tok.from_meta(meta["tokenizer"])


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
    self.directory = paths.resolve(workdir) / CHECKPOINT_DIR
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

  def path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def save(self, step: int, state, iterator, tokenizer, metrics: dict | None = None) -> None:
    """Starts an async save; the previous one is finished first (orbax does that)."""
    meta = {**meta_of(self.cfg, tokenizer), "fingerprints": fingerprints(state)}
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
    is no checkpoint. Every process reads the same step.

    Three kinds of failure, three behaviours:
    - damage (a flipped byte, a truncated or missing file): reported in one line and the step
      before is tried (with checkpoint.on_corrupt=fail, a one-line error instead); a writer
      moves the damaged steps aside to UNREADABLE_DIR, so later saves can reuse their numbers;
    - a train state whose structure is not this config's (another optimizer, train.trainable,
      LoRA, sync_every): a one-line error naming the config field; nothing is moved;
    - anything else (a transient I/O error): retried RESTORE_ATTEMPTS times, then a one-line
      error; nothing is moved.
    """
    if sys.unraisablehook is not _quiet_failed_reads:
      global _reporter
      _reporter, sys.unraisablehook = sys.unraisablehook, _quiet_failed_reads
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
          result, failure, error = restore_step(step), _OK, None
        except PROGRAM_ERRORS:  # a bad config or a bug, not the checkpoint: nothing to retry
          raise
        except Exception as e:  # TensorStore, orbax and JSON raise many kinds for damaged files
          result, failure, error = None, _failure_kind(e), e
        if error is not None:
          _drop_failed_reads()  # after the except block: nothing refers to the failed reads now
        failure = _worst_on_any_process(failure)
        if failure != _TRANSIENT or attempt == RESTORE_ATTEMPTS:
          break
        log(f"checkpoint {self.path(step)}: read failed ({_brief(error)}); retrying")
        time.sleep(RETRY_SECONDS * attempt)
      if failure == _OK:
        self._set_aside(damaged)
        return step, result
      reason = _brief(error) if error is not None else "failed on another process"
      if failure == _MISMATCH:
        raise lmc.ConfigError(
          error.describe(self.cfg, meta_config(self.meta(step)), self.path(step))
          if isinstance(error, StateMismatch)
          else f"--workdir: checkpoint {self.path(step)} does not fit this config on another "
          "process"
        )
      if failure == _TRANSIENT:
        raise lmc.ConfigError(
          f"--workdir: checkpoint {self.path(step)} could not be read in {RESTORE_ATTEMPTS} "
          f"attempts ({reason}); nothing was moved: check the storage and run again"
        )
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
      aside = self.directory.parent / UNREADABLE_DIR
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        self.path(step).replace(aside / f"{step}-{time.time():.0f}")
    _on_every_process(True)  # a barrier: no process saves before the move is done
    self.manager.reload()

  def restore(self, step: int, abstract_state, iterator=None) -> Any:
    """The train state at `step` laid out as `abstract_state` says; an iterator is set in
    place."""
    self._check_structure(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = _DataRestore(_IteratorItem(iterator))
    state = _read_on_every_process(
      lambda: self.manager.restore(step, args=ocp.args.Composite(**items)).state
    )
    self._check_fingerprints(step, fingerprints(state))
    return state

  def _check_structure(self, step: int, target, partial: bool = False) -> None:
    """StateMismatch when the saved train state has other arrays or shapes than the target
    (`partial`: than the target's top-level entries)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
      saved = _leaf_shapes(handler.metadata(self.path(step) / "state").tree)
    finally:
      handler.close()
    wanted = _leaf_shapes(target)
    if partial:
      saved = {path: shape for path, shape in saved.items() if path[0] in target}
    if saved != wanted:
      differing = sorted(set(saved.items()) ^ set(wanted.items()))
      raise StateMismatch("/".join(differing[0][0]))

  def restore_params(self, step: int, layout: Layout) -> Any:
    """The parameters alone at `step`, laid out as `layout` says: orbax's partial restore
    reads no optimizer state and no local-SGD replicas (what inference needs)."""
    target = {"params": layout.placed_params()}
    self._check_structure(step, target, partial=True)

    def read():
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
        return reader.restore(
          self.path(step) / "state",
          args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
          ),
        )

    restored = _read_on_every_process(read)
    # The train state's fingerprints name its fields as attributes: ".params[...]".
    found = {"." + path[2:].replace("']", "", 1): v for path, v in fingerprints(restored).items()}
    self._check_fingerprints(step, found)
    return restored["params"]

  def _check_fingerprints(self, step: int, found: dict[str, str]) -> None:
    saved = self.meta(step).get("fingerprints")
    if saved is None:  # checkpoints from before fingerprints have none
      return
    for path, value in found.items():
      expected = str(saved.get(path, value))  # an array added since: nothing to check
      dtype = value.split(":")[0]
      if ":" not in expected:  # written before fingerprints named the dtype
        expected = f"{dtype}:{expected}"
      if expected.split(":")[0] == dtype and expected != value:
        raise DamagedCheckpoint(f"state{path} differs from what was saved (fingerprint)")

  def meta(self, step: int) -> dict:
    return load_meta(self.path(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


class DamagedCheckpoint(Exception):
  """An array restored with other contents than were saved."""


class StateMismatch(Exception):
  """The saved train state's arrays are not those this config builds."""

  def describe(self, cfg, saved_cfg, path: str) -> str:
    """One line naming the config field that made the difference."""
    ours, theirs = _flat(cfg) if cfg is not None else {}, _flat(saved_cfg)
    candidates = STATE_FIELDS
    if ours.get("train.sync_every") and theirs.get("train.sync_every"):
      candidates += ("mesh.data", "mesh.dcn_data")  # the replicas' leading axis
    fields = [f for f in candidates if f in ours and ours[f] != theirs.get(f)]
    if not fields:
      return (
        f"--workdir: checkpoint {path} holds another train state than this config builds "
        f"(first difference: {self}); start a new workdir"
      )
    field, more = fields[0], fields[1:]
    also = f" ({', '.join(more)} also differ)" if more else ""
    return (
      f"config.{field}: {ours[field]!r}, but checkpoint {path} was saved with "
      f"{theirs.get(field)!r}{also}; that changes the train state's structure: set it back to "
      "resume, or start a new workdir"
    )


# Config fields that change the train state's structure, most likely culprit first.
STATE_FIELDS = (
  "optim.name",
  "optim.clip_norm",  # 0 drops the clipping transform's (empty) state from the chain
  "train.trainable",
  "model.lora_rank",
  "model.lora_targets",
  "model.adapter_dim",
  "train.sync_every",
  "train.outer_optimizer",
  "model.quantize",
  *(f"model.{field}" for field in lmc.SHAPE_FIELDS),
)
# Not the checkpoint's fault: a bad config, or a bug. Raised at once, never retried.
PROGRAM_ERRORS = (lmc.ConfigError, TypeError, AttributeError, NameError, AssertionError)
RESTORE_ATTEMPTS = 3
RETRY_SECONDS = 2.0  # times the attempt number
_OK, _TRANSIENT, _DAMAGE, _MISMATCH = 0, 1, 2, 3  # ordered: the worst on any process wins
# TensorStore's status codes: what a damaged file gives, and what an unavailable store gives.
_DAMAGE_CODES = (
  "DATA_LOSS",
  "NOT_FOUND",
  "OUT_OF_RANGE",
  "FAILED_PRECONDITION",
  "INVALID_ARGUMENT",  # a chunk that does not decode
  "Error decoding",
  "Unexpected end",
)
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


def _failure_kind(error: Exception) -> int:
  """Damage, a structure mismatch, or (anything else) a failure worth retrying."""
  chain = []
  while error is not None and len(chain) < 16:
    chain.append(error)
    error = error.__cause__ or error.__context__
  if any(isinstance(e, StateMismatch) for e in chain):
    return _MISMATCH
  text = " ".join(str(e) for e in chain)
  if any(isinstance(e, (TimeoutError, ConnectionError)) for e in chain) or any(
    code in text for code in _TRANSIENT_CODES
  ):
    return _TRANSIENT
  damage_types = (
    DamagedCheckpoint,
    FileNotFoundError,
    EOFError,
    zlib.error,
    json.JSONDecodeError,
    UnicodeDecodeError,
  )
  if any(isinstance(e, damage_types) for e in chain) or any(c in text for c in _DAMAGE_CODES):
    return _DAMAGE
  return _TRANSIENT


class _FailedElsewhere(Exception):
  """Another process's read of this step failed."""


def _read_on_every_process(read: Callable[[], Any]) -> Any:
  """read(), agreed on by every process before anything collective (the fingerprints) runs:
  a process whose read failed raises its error, the others _FailedElsewhere, so that all meet
  in restore_newest's agreement instead of one waiting in a collective the other never joins."""
  try:
    result, error = read(), None
  except Exception as e:
    result, error = None, e
  if _on_every_process(error is None):
    return result
  raise error if error is not None else _FailedElsewhere("failed on another process")


def _worst_on_any_process(kind: int) -> int:
  if jax.process_count() == 1:
    return kind
  return int(multihost_utils.process_allgather(np.asarray(kind, np.int32)).max())


def _leaf_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path of key names: shape} of a tree's arrays, for trees of arrays or of orbax metadata."""

  def name(key):
    for field in ("key", "idx", "name"):
      if hasattr(key, field):
        return str(getattr(key, field))
    return str(key)

  return {
    tuple(map(name, path)): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if hasattr(leaf, "shape")
  }


def _flat(cfg) -> dict:
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(f"{prefix}{key}.", value)
      else:
        out[prefix + key] = value

  walk("", cfg)
  return out


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


def load_meta(directory: str) -> dict:
  """The config and tokenizer of an export (or of one checkpoint step's directory)."""
  return json.loads((paths.resolve(directory) / "meta" / "metadata").read_text())
