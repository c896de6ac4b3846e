"""Every bad command line ends with exit code 2 and one line on stderr, never a traceback."""

import os
import subprocess
import sys
import types

import pytest

from tests.helpers import RUN_IMPORTS, forked_command_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "--config=experiments/demo.py:tiny"

# (name, arguments after `python -m experiments.run`, text the one line must contain)
BAD_COMMAND_LINES = [
  ("missing module", ["--config=experiments/nope.py"], "experiments/demo.py"),
  (
    "variant typo",
    ["--config=experiments/demo.py:tyni"],
    "choose 'default', 'tiny', 'lm', 'lm_tiny'",
  ),
  ("no config to train", [], "--config: required"),
  ("misspelt override", [DEMO, "--config.model.d_modle=3"], "d_modle"),
  ("override of wrong type", [DEMO, "--config.model.d_model=abc"], "d_model"),
  ("bad value", [DEMO, "--config.model.num_heads=5"], "config.model.num_heads:"),
  ("unknown optimizer", [DEMO, "--config.optim.name=lion"], "config.optim.name:"),
  ("zero stage out of range", [DEMO, "--config.zero_stage=7"], "config.zero_stage:"),
  ("negative steps", [DEMO, "--config.train.total_steps=-1"], "config.train.total_steps:"),
  ("mesh that does not fit", [DEMO, "--config.mesh.data=3"], "config.mesh"),
  (
    "batch not divisible by microbatches",
    [DEMO, "--config.train.global_batch_size=7", "--config.train.microbatches=2"],
    "config.train.global_batch_size:",
  ),
  (
    "decreasing length buckets",
    [DEMO, "--config.decode.length_buckets=(16,8)"],
    "config.decode.length_buckets:",
  ),
  ("missing data file", [DEMO, "--config.data.source=tsv:/nonexistent/train.tsv"], "data.source"),
  ("unknown source kind", [DEMO, "--config.data.source=ftp:x"], "data.source"),
  ("missing tokenizer", [DEMO, "--config.data.tokenizer=/nonexistent.model"], "data.tokenizer"),
  ("unknown mode", [DEMO, "--mode=fly"], "--mode"),
  ("unknown flag", [DEMO, "--stepz=3"], "stepz"),
  ("eval without checkpoint", ["--mode=eval"], "no checkpoint"),
  ("export without checkpoint", ["--mode=export", "--output=OUT"], "no checkpoint"),
  ("export without output", ["--mode=export"], "--output"),
  ("decode without checkpoint", ["--mode=decode", "--input=-"], "no checkpoint"),
  ("decode of a missing input", ["--mode=decode", "--input=/nonexistent.txt"], "--input"),
  ("serve without checkpoint", ["--mode=serve"], "no checkpoint"),
  ("serve of a missing export", ["--mode=serve", "--export=/nonexistent"], "--export"),
  (
    "serve with a bad setting",
    [DEMO, "--mode=serve", "--config.serve.max_batch=0"],
    "serve.max_batch",
  ),
  ("serve under several processes", [DEMO, "--mode=serve", "--distributed"], "--mode=serve runs"),
  (
    "serve with a missing key file",
    ["--mode=serve", "--api_key_file=/nonexistent/k"],
    "--api_key_file",
  ),
  ("probes keyed without keys", ["--mode=serve", "--api_keys_for_probes"], "needs --api_key_file"),
  (
    "serve with unknown batching",
    [DEMO, "--mode=serve", "--config.serve.batching=dynamic"],
    "config.serve.batching:",
  ),
  (
    "eval override it cannot honour",
    [DEMO, "--mode=eval", "--config.model.d_model=64"],
    "--config.model.d_model: --mode=eval takes the model",
  ),
  (
    "decode override it cannot honour",
    [DEMO, "--mode=decode", "--input=-", "--config.data.pack=false"],
    "--config.data.pack: --mode=decode",
  ),
  (
    "decode with no rows per batch",
    [DEMO, "--mode=decode", "--input=-", "--config.decode.batch_size=0"],
    "config.decode.batch_size:",
  ),
  (
    "weight decay that adam would ignore",
    [DEMO, "--config.optim.name=adam", "--config.optim.weight_decay=0.1"],
    "config.optim.weight_decay:",
  ),
]


def _run(args, workdir):
  """`python -m experiments.run` in a process of its own: the real command line."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *args],
    cwd=ROOT,
    env=env,
    input="",
    capture_output=True,
    text=True,
    timeout=300,
  )


def _run_forked(cases, tmp_path) -> list[tuple[int, str]]:
  """(exit code, stderr) of each argument list after `python -m experiments.run --workdir=W`,
  each with a workdir of its own and an empty stdin."""
  argvs = []
  for i, args in enumerate(cases):
    workdir = str(tmp_path / str(i))
    argvs.append([f"--workdir={workdir}", *(a.replace("OUT", f"{workdir}/out") for a in args)])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return forked_command_lines("experiments.run", argvs, tmp_path, RUN_IMPORTS, env)


def _one_line_failure(name, expected, returncode, stderr) -> str | None:
  lines = [line for line in stderr.splitlines() if line.strip()]
  ok = (
    returncode == 2
    and len(lines) == 1
    and lines[0].startswith("error: ")
    and expected in lines[0]
    and "Traceback" not in stderr
  )
  return None if ok else f"{name}: exit {returncode}, stderr:\n{stderr[-1500:]}"


def test_bad_command_lines_end_in_one_line(tmp_path):
  assert len(BAD_COMMAND_LINES) >= 20
  results = _run_forked([args for _, args, _ in BAD_COMMAND_LINES], tmp_path)
  failures = [
    _one_line_failure(name, expected, *result)
    for (name, _, expected), result in zip(BAD_COMMAND_LINES, results, strict=True)
  ]
  failures = [f for f in failures if f]
  assert not failures, "\n\n".join(failures)


# Through `python -m experiments.run` itself: one failing in absl's parsing, one in main.
REAL_PROCESS_CASES = ["misspelt override", "bad value"]


@pytest.mark.parametrize("name", REAL_PROCESS_CASES)
def test_a_bad_command_line_of_its_own_process_ends_in_one_line(tmp_path, name):
  ((args, expected),) = [(a, e) for n, a, e in BAD_COMMAND_LINES if n == name]
  result = _run(args, str(tmp_path))
  failure = _one_line_failure(name, expected, result.returncode, result.stderr)
  assert failure is None, failure


EXPERIMENTS = [
  ("demo", "default"),
  ("demo", "tiny"),
  ("demo", "lm"),
  ("demo_adapt", "lora"),
  ("speed", "default"),
  ("wmt_ende", "base"),
  ("wmt_ende", "big"),
  ("lm1b", None),
  ("gpt2", "small"),
  ("gpt2", "medium"),
]


@pytest.mark.parametrize("module,variant", EXPERIMENTS)
def test_every_experiment_lays_out_and_its_decoder_takes_every_input_it_accepts(module, variant):
  """Each experiment's layout (abstract: eval_shape, no compile) on 8 devices, and its decoder's
  limits and programs traced at every shape it compiles."""
  import functools

  import jax
  import numpy as np

  from lm import config as lmc
  from lm import decode
  from lm.layout import Layout

  get_config = __import__(f"experiments.{module}", fromlist=["get_config"]).get_config
  cfg = get_config(variant) if variant else get_config()
  lmc.validate(cfg)
  assert cfg.data.source
  # Its own mesh may be a pod's.
  cfg.mesh.update(stage=1, data=1, fsdp=-1, tensor=1, dcn_stage=1, dcn_data=1)
  layout = Layout.build(cfg)
  options = decode.DecodeOptions.from_config(cfg.decode)
  vocab = types.SimpleNamespace(vocab_size=layout.vocab_limit, pad_id=0, bos_id=2, eos_id=3)
  decoder = decode.Decoder(layout, None, vocab, options, cfg.decode.batch_size)
  m = cfg.model
  widths = [width for width, _ in decoder.shapes]
  if cfg.task == "lm":  # a prompt of the longest accepted length still has room to generate
    assert 1 <= decoder.max_input_tokens < widths[0] <= m.max_len
    assert decoder.max_input_tokens <= cfg.data.seq_len - 2
  else:  # the longest source, with its EOS, fits the widest bucket
    assert decoder.max_input_tokens + 1 <= max(widths) == cfg.data.seq_len
  if m.positions == "learned":
    assert all(out <= m.max_len for _, out in decoder.shapes), decoder.shapes
  rows = decoder.row_counts[0]
  per_row = {
    name: jax.ShapeDtypeStruct((rows,), np.float32 if name in FLOAT_SETTINGS else np.int32)
    for name in ("length", "cap", "seed", "temperature", "top_k", "top_p", "alpha", "ignore_eos")
  }
  for width, out in decoder.shapes[-1:]:  # the largest program: traced, not compiled
    program = functools.partial(
      decode._decode_batch,
      layout,
      options,
      decoder.specials,
      out,
      options.beam_size,
      layout.vocab_limit,
    )
    tokens = jax.ShapeDtypeStruct((rows, width), np.int32)
    result = jax.eval_shape(program, layout.abstract_params, tokens, per_row)
    assert result.shape == (rows, out)


FLOAT_SETTINGS = ("temperature", "top_p", "alpha")


def test_the_flax_comparison_names_a_missing_example_in_one_line(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "experiments.compare_flax_wmt", f"--flax_wmt={tmp_path}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("error: --flax_wmt:") and "train.py" in lines[0]


def test_overrides_are_found_in_every_form_absl_accepts():
  """init_from and the inference modes act on the overridden fields: none may slip through."""
  argv = [
    "run",
    DEMO,
    "--config.model.d_model",  # the value as the next argument
    "64",
    "-config.train.total_steps=3",  # one dash
    "--noconfig.data.pack",  # a boolean turned off
    "--workdir=w",
  ]
  code = (
    "import sys; from experiments import run; "
    f"sys.argv = {argv!r}; run.parse_flags(sys.argv); print(sorted(run.overridden_fields()))"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.stdout.split() == ["['data.pack',", "'model.d_model',", "'train.total_steps']"], (
    result.stdout + result.stderr[-2000:]
  )
