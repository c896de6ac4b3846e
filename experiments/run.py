"""The one entry point.

python -m experiments.run --config=experiments/demo.py --workdir=runs/demo
python -m experiments.run --config=experiments/wmt_ende.py:base --config.zero_stage=3 ...
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<module>.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, metrics and checkpoints.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "export"],
  "train (resumes from WORKDIR's latest checkpoint) | export (its parameters to --output).",
)
_OUTPUT = flags.DEFINE_string("output", None, "export: the directory to write.")
_EXPORT_DTYPE = flags.DEFINE_enum(
  "export_dtype", "float32", ["float32", "bfloat16"], "export: parameter dtype."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  from lm import train  # noqa: PLC0415 (flags parse before jax initializes)

  try:
    if _MODE.value == "train":
      if _CONFIG.value is None:
        raise ConfigError("--config: required to train; e.g. --config=experiments/demo.py")
      train.train(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "export":
      if not _OUTPUT.value:
        raise ConfigError("--output: required with --mode=export; name a new directory")
      step = train.export(_WORKDIR.value, _OUTPUT.value, _EXPORT_DTYPE.value)
      print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingHalted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


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
