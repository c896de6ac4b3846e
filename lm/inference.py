"""A trained model for inference: parameters alone restored onto a layout, from a workdir's
latest checkpoint or an export, and exports written.

Eval, decode, export, serve, `train.init_from` and a teacher read models through here; the
checkpoint's own config decides the model, a mode's settings decide the mesh and decoding.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm import config as lmc
from lm import paths
from lm.checkpoint import (
  CHECKPOINT_DIR,
  Checkpointer,
  load_meta,
  meta_config,
  meta_of,
  meta_tokenizer,
)
from lm.data import tokenizer as tok
from lm.layout import Layout
from lm.models import layers


def write_export(
  directory: str, params, cfg, tokenizer: tok.Tokenizer, dtype: str = "float32", step: int = 0
) -> None:
  """Parameters only (optionally cast), with the config, tokenizer and training step: what
  decoding and serving load."""
  if dtype != "float32":
    params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == np.float32 else x, params)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
      paths.resolve(directory),
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({**meta_of(cfg, tokenizer), "step": step}),
      ),
      force=True,
    )


def load_export(directory: str, abstract_params) -> Any:
  """Parameters of an export, laid out (and cast) as `abstract_params` says."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
      paths.resolve(directory),
      args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)),
    )
  return restored.params


def _inference_config(meta: dict, mesh_cfg, settings: dict | None) -> ml_collections.ConfigDict:
  """The saved config on `mesh_cfg`'s mesh and ZeRO stage, or (None) fsdp over every device;
  then `settings` ({field: value}, from lmc.inference_settings) over it."""
  cfg = meta_config(meta)
  if mesh_cfg is None:
    cfg.mesh.update(stage=1, data=1, fsdp=-1, tensor=1, dcn_stage=1, dcn_data=1)
  else:
    cfg.mesh.update(mesh_cfg.mesh.to_dict())
    cfg.zero_stage = mesh_cfg.zero_stage
    # How the layers lie on the stages is the run's, like its mesh: a model trained without
    # stages (or with others) restores into this run's stage order.
    for field in lmc.PIPELINE_FIELDS:
      section, name = field.split(".")
      cfg[section][name] = mesh_cfg[section][name]
  if settings:
    cfg.update_from_flattened_dict(settings)
  return cfg


def restore_latest(
  workdir: str, devices=None, mesh_cfg=None, settings: dict | None = None
) -> tuple[Layout, Any, tok.Tokenizer, int]:
  """(layout, params, tokenizer, step) of the workdir's latest checkpoint, for inference: the
  parameters alone are read.

  The model comes from the checkpoint's own config; the mesh fills the given devices, as fsdp
  or as `mesh_cfg` (a config) says; `settings` are a mode's own fields over it.
  """
  checkpoints = Checkpointer(workdir)

  def read(step):
    meta = checkpoints.meta(step)
    cfg, tokenizer = _inference_config(meta, mesh_cfg, settings), meta_tokenizer(meta)
    built = Layout.build(cfg, devices, tokenizer_size=tokenizer.vocab_size)
    return built, built.in_memory_order(checkpoints.restore_params(step, built)), tokenizer

  try:
    step, restored = checkpoints.restore_newest(read, log=lambda line: print(line, file=sys.stderr))
  finally:  # also on errors: an open manager's threads print a traceback at exit
    checkpoints.close()
  if step is None:
    raise lmc.ConfigError(f"--workdir: no checkpoint in {checkpoints.directory}; train first")
  built, params, tokenizer = restored
  return built, params, tokenizer, step


def source_meta(path: str, field: str = "train.init_from") -> dict:
  """The meta (config, tokenizer, step) of a trained model given as an export, a workdir (its
  latest checkpoint) or a Hugging Face model (hf:PATH or hf:ORG/NAME)."""
  label = field if field.startswith("--") else f"config.{field}"
  if _is_hf(path):
    from lm.hf import models as hf_models  # only runs that import a model need it

    return hf_models.meta(path, label)
  if _is_export(path):
    return load_meta(path)
  checkpoints = Checkpointer(path) if (paths.resolve(path) / CHECKPOINT_DIR).is_dir() else None
  try:
    step = checkpoints.latest_step() if checkpoints else None
    if step is None:
      raise lmc.ConfigError(
        f"{label}: {path!r} is neither an export nor a workdir with a checkpoint"
      )
    return {**checkpoints.meta(step), "step": step}
  finally:
    if checkpoints:
      checkpoints.close()


def restore_for_inference(
  workdir: str, export: str | None = None, devices=None, mesh_cfg=None, settings=None
) -> tuple[Layout, Any, tok.Tokenizer, int]:
  """An export if one is named, else the workdir's latest checkpoint (see restore_latest)."""
  if export:
    return restore_export(export, devices, mesh_cfg, settings)
  return restore_latest(workdir, devices, mesh_cfg, settings)


def restore_model(
  path: str, mesh_cfg, field: str, devices=None
) -> tuple[Layout, Any, tok.Tokenizer, int]:
  """(layout, params, tokenizer, step) of an export or a workdir's latest checkpoint (the model
  named by config field `field`), laid out on `mesh_cfg`'s mesh and ZeRO stage."""
  source_meta(path, field)  # a clear error for a path that holds no model
  return restore_for_inference(path, path if _is_export(path) else None, devices, mesh_cfg)


def _is_export(path: str) -> bool:
  return _is_hf(path) or (paths.resolve(path) / "meta" / "metadata").is_file()


def _is_hf(path: str) -> bool:
  return path.startswith("hf:")


def export(
  workdir: str,
  output: str,
  dtype: str = "float32",
  merge_lora: bool = False,
  to: str = "zerolm",
) -> int:
  """Writes the latest checkpoint's parameters (+ config, tokenizer) to `output`; its step.
  `merge_lora`: LoRA's updates folded into the kernels, the export a model without LoRA.
  dtype "int8": matmul kernels as int8 with per-channel scales (model.quantize).
  to "hf": a Hugging Face checkpoint (config.json, safetensors, the tokenizer's files) that
  transformers' from_pretrained loads; LoRA is merged first."""
  if to == "hf":
    _check_hf_export(workdir, output, dtype)
  built, params, tokenizer, step = restore_latest(workdir)
  cfg = built.cfg
  if to == "hf":
    merge_lora = bool(cfg.model.lora_rank)
  if merge_lora:
    m = cfg.model
    if not m.lora_rank:
      raise lmc.ConfigError(f"--merge_lora: {workdir!r} has no LoRA (model.lora_rank is 0)")
    with jax.set_mesh(built.mesh):
      params = jax.jit(lambda p: layers.merge_lora(p, m.lora_alpha / m.lora_rank))(params)
    cfg = cfg.copy_and_resolve_references()
    cfg.model.lora_rank = 0
  if dtype == "int8":
    with jax.set_mesh(built.mesh):
      params = jax.jit(layers.quantize_int8)(params)
    cfg = cfg.copy_and_resolve_references()
    cfg.model.quantize, dtype = "int8", "float32"  # scales and unquantized tensors stay float
  if to == "hf":
    from lm.hf import models as hf_models

    cfg = cfg.copy_and_resolve_references()
    cfg.model.param_dtype = dtype
    layout = Layout.build(cfg, devices=list(built.mesh.devices.flat))
    hf_models.export(output, layout, params, tokenizer)
  else:
    write_export(output, params, cfg, tokenizer, dtype, step)
  return step


def _check_hf_export(workdir: str, output: str, dtype: str) -> None:
  """--format=hf's refusals, from the checkpoint's meta alone: before anything is restored."""
  from lm.hf import architectures
  from lm.hf import models as hf_models

  hf_models.check_output(output)
  if dtype == "int8":
    raise lmc.ConfigError(
      "--export_dtype=int8: transformers has no equivalent of zerolm's int8 kernels; export "
      "--format=hf in float32 or bfloat16"
    )
  meta = source_meta(workdir, "--workdir")
  cfg = meta_config(meta).copy_and_resolve_references()
  cfg.model.update(lora_rank=0)  # merged first
  if cfg.task == "classify":
    raise lmc.ConfigError(
      "--format=hf: a classifier (task=classify) has no transformers architecture here; export "
      "--format=zerolm"
    )
  architectures.architecture_of(cfg)
  if isinstance(meta["tokenizer"], str):  # zerolm's own, base64 (see lm.data.tokenizer)
    raise lmc.ConfigError(hf_models.OWN_TOKENIZER)


def restore_export(
  directory: str, devices=None, mesh_cfg=None, settings=None
) -> tuple[Layout, Any, tok.Tokenizer, int]:
  """(layout, params, tokenizer, step) of an export or a Hugging Face model (hf:...), laid
  out as restore_latest does."""
  if not _is_export(directory):
    raise lmc.ConfigError(f"--export: {directory!r} is not an export (no meta/metadata)")
  meta = source_meta(directory, "--export") if _is_hf(directory) else load_meta(directory)
  cfg, tokenizer = _inference_config(meta, mesh_cfg, settings), meta_tokenizer(meta)
  built = Layout.build(cfg, devices, tokenizer_size=tokenizer.vocab_size)
  if _is_hf(directory):
    from lm.hf import models as hf_models

    params = hf_models.load_params(meta, built)
  else:
    params = load_export(directory, built.placed_params())
  return built, built.in_memory_order(params), tokenizer, meta.get("step", 0)
