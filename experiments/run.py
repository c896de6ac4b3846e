"""The one entry point.

python -m experiments.run --config=experiments/demo.py --workdir=runs/demo
python -m experiments.run --config=experiments/wmt_ende.py:base --config.zero_stage=3 ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<module>.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, metrics and checkpoints.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "decode", "export", "serve"],
  "train (resumes from WORKDIR's latest checkpoint) | eval (its held-out metrics and BLEU to "
  "WORKDIR/eval.json) | decode (--input lines to --output lines) | export (its parameters to "
  "--output) | serve (an HTTP API and web page on --host:--port). With --config, eval, "
  "decode and serve take its mesh, zero_stage, decode, eval and serve settings (and the "
  "eval source, data.seq_len and batch sizes it overrides); the model comes from the checkpoint.",
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "serve: the port to listen on.")
_API_KEY_FILE = flags.DEFINE_string(
  "api_key_file",
  None,
  "serve: API keys, one per line; every /v1/ request then needs Authorization: Bearer KEY.",
)
_KEYS_FOR_PROBES = flags.DEFINE_bool(
  "api_keys_for_probes", False, "serve, with --api_key_file: /healthz and /metrics need a key too."
)
_EXPORT = flags.DEFINE_string(
  "export",
  None,
  "eval, decode, serve: an export directory instead of WORKDIR's checkpoint, or a Hugging Face "
  "model (hf:DIR, or hf:ORG/NAME downloaded when a network exists).",
)
_TARGET_LANG = flags.DEFINE_string(
  "target_lang",
  None,
  "decode: the target language of a model trained on several pairs (its tag is prepended to "
  "each line); a model with one target language takes it by default.",
)
_INPUT = flags.DEFINE_string("input", "-", "decode: one source (or prompt) per line; - = stdin.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "decode: one output per input line (- = stdout); export: a new directory."
)
_MERGE_LORA = flags.DEFINE_bool(
  "merge_lora",
  False,
  "--mode=export: fold LoRA's factors into the weights they adapt, so serving pays nothing.",
)
_EXPORT_DTYPE = flags.DEFINE_enum(
  "export_dtype",
  "float32",
  ["float32", "bfloat16", "int8"],
  "export: parameter dtype; int8 = matmul kernels as int8 with per-channel float scales.",
)
_FORMAT = flags.DEFINE_enum(
  "format",
  "zerolm",
  ["zerolm", "hf"],
  "export: zerolm (what --export reads) or hf (config.json, safetensors and the tokenizer's "
  "files, for transformers' from_pretrained; LoRA merged first).",
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
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout",
  100,
  "--distributed: seconds without a heartbeat after which a process counts as lost and every "
  "other process exits non-zero (JAX's coordination service).",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  if _DISTRIBUTED.value and _MODE.value == "serve":
    _fail(
      "--distributed: --mode=serve runs as one process (several would each take their own "
      "requests and deadlock in the collectives); serve from one host's devices"
    )
  if _DISTRIBUTED.value:
    from lm.parallel import mesh

    mesh.init_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT_TIMEOUT.value
    )
  # Imported here: jax must not initialize before --distributed has set up the processes.
  import jax

  from lm import evaluate, inference, metrics, train

  try:
    if _TARGET_LANG.value is not None and _MODE.value != "decode":
      raise ConfigError(
        "--target_lang: only --mode=decode takes it (a request to the service names its own)"
      )
    if _MODE.value == "train":
      if _CONFIG.value is None:
        raise ConfigError("--config: required to train; e.g. --config=experiments/demo.py")
      train.train(_CONFIG.value, _WORKDIR.value, overridden_fields())
    elif _MODE.value == "eval":
      log = metrics.Console()
      settings = inference_settings("eval")
      results = evaluate.evaluate_workdir(_WORKDIR.value, log, _EXPORT.value, settings)
      if jax.process_index() == 0:
        print(json.dumps(results, indent=2))
    elif _MODE.value == "decode":
      decode_lines(_INPUT.value, _OUTPUT.value or "-")
    elif _MODE.value == "export":
      if not _OUTPUT.value:
        raise ConfigError("--output: required with --mode=export; name a new directory")
      step = inference.export(
        _WORKDIR.value,
        _OUTPUT.value,
        _EXPORT_DTYPE.value,
        merge_lora=_MERGE_LORA.value,
        to=_FORMAT.value,
      )
      if jax.process_index() == 0:
        print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")
    elif _MODE.value == "serve":
      serve_model()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingHalted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except jax.errors.JaxRuntimeError as e:
    if not _DISTRIBUTED.value:
      raise
    # Another process died (or its host): the job cannot go on, and JAX's shutdown barrier
    # would wait for the lost process. The last committed checkpoint is whole.
    first_line = str(e).strip().splitlines()[0][:300]
    print(f"error: a collective failed, most likely a lost process: {first_line}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def overridden_fields() -> set[str]:
  """The config fields the command line sets, in any of absl's forms (--config.a.b=v,
  --config.a.b v, -config.a.b=v, --noconfig.flag)."""
  return set(config_flags.get_override_values(flags.FLAGS["config"]))


def inference_settings(mode: str) -> dict | None:
  """What --config brings to an inference mode (lm.config.inference_settings); None without
  --config."""
  from lm import config as lm_config

  if _CONFIG.value is None:
    return None
  return lm_config.inference_settings(_CONFIG.value, overridden_fields(), mode)


def decode_lines(input_path: str, output_path: str) -> None:
  """Under several processes every process decodes every line (the model is sharded over all
  of them) and process 0 writes the output."""
  import jax  # after main's jax set-up, as there

  from lm.data import multilingual
  from lm.decode import Decoder

  if input_path != "-" and not os.path.exists(input_path):
    raise ConfigError(f"--input: {input_path!r} does not exist")
  settings = inference_settings("decode")
  saved = saved_config()  # checked before the model loads
  classifying = saved is not None and saved.task == "classify"
  languages = multilingual.target_languages(saved) if saved is not None else None
  if saved is not None and saved.task != "translation" and _TARGET_LANG.value is not None:
    raise ConfigError(f"--target_lang: a {saved.task!r} model translates nothing; omit it")
  check_target_lang(languages)
  if classifying:
    from lm.classify import Classifier, format_answer

    decoder = Classifier.from_workdir(_WORKDIR.value, export=_EXPORT.value, settings=settings)
  else:
    decoder = Decoder.from_workdir(_WORKDIR.value, export=_EXPORT.value, settings=settings)
  if languages is None:  # read from no meta: the model's own config
    languages = multilingual.target_languages(decoder.layout.cfg)
    check_target_lang(languages)
  source = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8")
  with source:
    lines = [line.rstrip("\n") for line in source]
  lines = [
    multilingual.prefixed(line, languages, _TARGET_LANG.value) if line.strip() else line
    for line in lines
  ]

  writer = jax.process_index() == 0

  def progress(done: int, total: int) -> None:
    if writer:
      print(f"\rdecoded {done}/{total} lines", end="" if done < total else "\n", file=sys.stderr)

  outputs = decoder(lines, progress=progress)
  if classifying:  # LABEL<TAB>{"name": probability, ...} per line
    outputs = [format_answer(answer) for answer in outputs]
  if not writer:
    return
  sink = sys.stdout if output_path == "-" else open(output_path, "w", encoding="utf-8")
  with sink:
    sink.writelines(line + "\n" for line in outputs)


def saved_config():
  """The config of the model --workdir (or --export) holds, read from its meta alone; None
  where there is none (loading the model then says what is missing, in its own words)."""
  from lm import checkpoint, inference

  path = _EXPORT.value or _WORKDIR.value
  try:
    meta = inference.source_meta(path, "--export" if _EXPORT.value else "--workdir")
  except ConfigError:
    return None
  return checkpoint.meta_config(meta)


def check_target_lang(languages: tuple[str, ...] | None) -> None:
  from lm.data import multilingual

  problem = (
    multilingual.language_error(languages, _TARGET_LANG.value) if languages is not None else ""
  )
  if problem:
    raise ConfigError(f"--target_lang: {problem}")


def serve_model() -> None:
  from lm import inference, serve  # after main's jax set-up, as there
  from lm.decode import DecodeOptions, Decoder

  settings = inference_settings("serve")  # checked before anything loads
  keys = None
  if _API_KEY_FILE.value:
    try:
      keys = serve.read_api_keys(_API_KEY_FILE.value)
    except (OSError, ValueError) as e:
      _fail(f"--api_key_file: {e}")
  elif _KEYS_FOR_PROBES.value:
    _fail("--api_keys_for_probes needs --api_key_file")
  layout, params, tokenizer, step = inference.restore_for_inference(
    _WORKDIR.value, _EXPORT.value, settings=settings
  )
  cfg = layout.cfg
  if cfg.task == "classify":  # /v1/classify: static batches, no decode engine
    from lm import serve_classify
    from lm.classify import Classifier

    model, service = Classifier(layout, params, tokenizer, cfg.serve.max_batch), serve_classify
  else:
    options = DecodeOptions.from_config(cfg.decode)
    buckets = tuple(cfg.serve.length_buckets) or options.length_buckets
    options = dataclasses.replace(options, length_buckets=buckets)
    model, service = Decoder(layout, params, tokenizer, options, cfg.serve.max_batch), serve
  del params  # the model's: with pipeline stages a copy on a layout without them
  service.serve(
    model,
    step,
    cfg.serve,
    _HOST.value,
    _PORT.value,
    api_keys=keys,
    guard_probes=_KEYS_FOR_PROBES.value,
  )


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


# Modules of experiments/ that are tools, not experiments (no get_config).
NOT_EXPERIMENTS = (
  "__init__.py",
  "run.py",
  "bench.py",
  "bench_hf_load.py",
  "bench_line_source.py",
  "compare_flax_wmt.py",
  "loadtest.py",
  "sweep.py",
  "sweep_report.py",
  "sweep_space.py",
  "sweep_study.py",
  "sweep_trial.py",
)


def check_config_module(argv) -> None:
  """A --config module that does not exist: one line listing those that do."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  for value in values:
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      here = os.path.dirname(os.path.abspath(__file__))
      modules = sorted(
        f"experiments/{name}"
        for name in os.listdir(here)
        if name.endswith(".py") and name not in NOT_EXPERIMENTS
      )
      _fail(f"--config: {path!r} does not exist; experiment modules: {', '.join(modules)}")


def parse_flags(argv):
  """absl parsing, with a bad --config module, variant or override reported in one line."""
  check_config_module(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
    if message[:1] in "'\"" and message[-1:] == message[:1]:  # absl wraps some in quotes
      message = message[1:-1]
    # An error raised inside the config module (a bad variant) comes wrapped in its traceback:
    # keep the module's own message.
    raised = re.findall(r"\b\w*Error: (.*?)(?=\s+\w*Error: |$)", message.split("Traceback")[-1])
    if "Traceback" in message and raised:
      _fail(f"--config: {raised[-1].strip()}")
    _fail(f"bad flag or --config override: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
