"""Hugging Face models as zerolm model sources (`hf:PATH`, `hf:ORG/NAME`) and export targets.

`hf:PATH` is a local directory with config.json, safetensors weights and the tokenizer's
files; `hf:ORG/NAME` is downloaded through huggingface_hub into its cache when a network
exists. Wherever a trained model is accepted (train.init_from, train.teacher, --export), such a
source gives the same (meta, parameters on a layout) as a zerolm export does.
"""

from __future__ import annotations

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from lm import config as lmc
from lm.hf import architectures, weights
from lm.hf import tokenizer as hf_tokenizer

PREFIX = "hf:"
# transformers' own files: not consolidated*.safetensors, Mistral's second copy of the weights.
HUB_FILES = ["*.json", "model*.safetensors", "*.model", "*.spm", "*.txt"]


OWN_TOKENIZER = (
  "--format=hf: this model's tokenizer is zerolm's own SentencePiece model, which transformers "
  "cannot load as a tokenizer; export --format=zerolm, or start from an hf: model"
)


def local_directory(spec: str, field: str) -> str:
  """The local directory an hf: source names, downloaded first for a hub id."""
  name = spec[len(PREFIX) :]
  if os.path.isdir(name):
    directory = name
  elif re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
    directory = _download(name, field)
  else:
    raise lmc.ConfigError(f"{field}: {spec!r}: no such directory")
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise lmc.ConfigError(
      f"{field}: {directory!r} has no config.json; an hf: model is a directory with "
      "config.json, *.safetensors and the tokenizer's files"
    )
  return directory


def _download(repo_id: str, field: str) -> str:
  import huggingface_hub  # only hub ids need it

  try:
    return huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
  except Exception as e:  # offline, unknown repo, no access: one line, with the local form
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise lmc.ConfigError(
      f"{field}: cannot download {repo_id!r} from the Hugging Face hub ({reason}); on a "
      f"machine without network download it elsewhere and pass hf:/path/to/its/directory"
    ) from None


def read_config_json(directory: str) -> dict:
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def _with_generation_ends(directory: str, hf: dict) -> dict:
  """config.json with generation_config.json's end ids after its own: instruct models list
  their turn-end token there (Qwen2.5-Instruct's 151645), and transformers' generate stops at
  each."""
  path = os.path.join(directory, "generation_config.json")
  if not os.path.isfile(path):
    return hf
  with open(path) as f:
    extra = json.load(f).get("eos_token_id")
  ends = []
  for ids in (hf.get("eos_token_id"), extra):
    for i in ids if isinstance(ids, list) else [ids]:
      if i is not None and i not in ends:
        ends.append(i)
  return {**hf, "eos_token_id": ends or None}


def meta(spec: str, field: str) -> dict:
  """What a zerolm checkpoint's meta holds (config, tokenizer, step) for an hf: source."""
  directory = local_directory(spec, field)
  hf = read_config_json(directory)
  cfg = architectures.model_config(hf, directory)
  tokenizer = hf_tokenizer.load(directory, _with_generation_ends(directory, hf))
  if tokenizer.eos_id is None:
    raise lmc.ConfigError(
      f"{directory}/config.json: eos_token_id is unset and the tokenizer names no eos_token; "
      "set the id that ends a sequence"
    )
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise lmc.ConfigError(
      f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the embedding only "
      f"{cfg.model.vocab_size} rows (config.json vocab_size); they must match the checkpoint"
    )
  return {
    "config": json.loads(cfg.to_json_best_effort()),
    "tokenizer": tokenizer.to_meta(),
    "step": 0,
    "hf": {"directory": os.path.abspath(directory), "model_type": hf["model_type"]},
  }


def load_params(source_meta: dict, layout) -> dict:
  """The checkpoint's parameters read into the layout's shardings (see lm.hf.weights)."""
  info = source_meta["hf"]
  tensors = architectures.tensors(
    info["model_type"], layout.dims, source_meta["config"]["model"]["vocab_size"]
  )
  files = weights.CheckpointFiles(info["directory"])
  try:
    return weights.load(files, tensors, layout.abstract_params, layout.shardings.params)
  finally:
    files.close()


def check_output(output: str) -> None:
  if "://" in output:
    raise lmc.ConfigError(
      f"--output: {output!r}: --format=hf writes to a local directory; copy it to the bucket "
      "afterwards (gsutil cp -r)"
    )


def export(output: str, layout, params, tokenizer) -> list[str]:
  """Writes `params` (a model without LoRA, in float) as a Hugging Face checkpoint: config.json,
  safetensors and the tokenizer's files. The file names written."""
  cfg = layout.cfg
  check_output(output)
  hf = architectures.config_json(cfg, tokenizer)  # refuses options without an equivalent
  save = getattr(tokenizer, "save", None)  # the checkpoints' tokenizers have it, zerolm's not
  if save is None:
    raise lmc.ConfigError(OWN_TOKENIZER)
  tensors = architectures.tensors(hf["model_type"], layout.dims, cfg.model.vocab_size)
  bf16 = cfg.model.param_dtype == "bfloat16"
  names = weights.write(
    output, tensors, params, layout.mesh, ml_dtypes.bfloat16 if bf16 else np.float32
  )
  if jax.process_index() == 0:
    hf["torch_dtype"] = "bfloat16" if bf16 else "float32"
    with open(os.path.join(output, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    save(output)
  # No process reports the export done before process 0 has written it.
  multihost_utils.sync_global_devices("hf export written")
  return names
