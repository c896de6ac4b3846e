"""The one entry point.

python -m experiments.run --config=experiments/demo.py --workdir=runs/demo
python -m experiments.run --config=experiments/wmt_ende.py:base --config.zero_stage=3 ...
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<module>.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, metrics and checkpoints.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "decode", "export"],
  "train (resumes from WORKDIR's latest checkpoint) | eval (its held-out metrics and BLEU to "
  "WORKDIR/eval.json) | decode (--input lines to --output lines) | export (its parameters to "
  "--output).",
)
_INPUT = flags.DEFINE_string("input", "-", "decode: one source (or prompt) per line; - = stdin.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "decode: one output per input line (- = stdout); export: a new directory."
)
_EXPORT_DTYPE = flags.DEFINE_enum(
  "export_dtype", "float32", ["float32", "bfloat16"], "export: parameter dtype."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "One of several processes: jax.distributed.initialize() before anything else, with the "
  "coordinator and process ids detected on TPU VMs, SLURM and Open MPI or given below.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--distributed: host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process, 0-based.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  if _DISTRIBUTED.value:
    from lm.parallel import mesh  # noqa: PLC0415

    mesh.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from lm import checkpoint, train  # noqa: PLC0415 (flags parse before jax initializes)

  try:
    if _MODE.value == "train":
      if _CONFIG.value is None:
        raise ConfigError("--config: required to train; e.g. --config=experiments/demo.py")
      train.train(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "eval":
      from lm import evaluate, metrics  # noqa: PLC0415

      decode_cfg = _CONFIG.value.decode if _CONFIG.value is not None else None
      log = metrics.Console()
      results = evaluate.evaluate_workdir(_WORKDIR.value, decode_cfg, log)
      print(json.dumps(results, indent=2))
    elif _MODE.value == "decode":
      decode_lines(_INPUT.value, _OUTPUT.value or "-")
    elif _MODE.value == "export":
      if not _OUTPUT.value:
        raise ConfigError("--output: required with --mode=export; name a new directory")
      step = checkpoint.export(_WORKDIR.value, _OUTPUT.value, _EXPORT_DTYPE.value)
      print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingHalted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def decode_lines(input_path: str, output_path: str) -> None:
  from lm.decode import Decoder  # noqa: PLC0415

  if input_path != "-" and not os.path.exists(input_path):
    raise ConfigError(f"--input: {input_path!r} does not exist")
  decode_cfg = _CONFIG.value.decode if _CONFIG.value is not None else None
  decoder = Decoder.from_workdir(_WORKDIR.value, decode_cfg)
  source = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8")
  with source:
    lines = [line.rstrip("\n") for line in source]

  def progress(done: int, total: int) -> None:
    print(f"\rdecoded {done}/{total} lines", end="" if done < total else "\n", file=sys.stderr)

  outputs = decoder(lines, progress=progress)
  sink = sys.stdout if output_path == "-" else open(output_path, "w", encoding="utf-8")
  with sink:
    sink.writelines(line + "\n" for line in outputs)


def parse_flags(argv):
  """absl parsing, with a bad --config override reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
    print(f"error: bad flag or --config override: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
