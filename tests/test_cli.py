"""Every bad command line ends with exit code 2 and one line on stderr, never a traceback."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "--config=experiments/demo.py:tiny"

# (name, arguments after `python -m experiments.run`, text the one line must contain)
BAD_COMMAND_LINES = [
  ("missing module", ["--config=experiments/nope.py"], "experiments/demo.py"),
  ("variant typo", ["--config=experiments/demo.py:tyni"], "choose 'default' or 'tiny'"),
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
    "eval override it cannot honour",
    [DEMO, "--mode=eval", "--config.model.d_model=64"],
    "--config.model.d_model: --mode=eval takes the model",
  ),
  (
    "decode override it cannot honour",
    [DEMO, "--mode=decode", "--input=-", "--config.data.seq_len=8"],
    "--config.data.seq_len: --mode=decode",
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
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  args = [a.replace("OUT", os.path.join(workdir, "out")) for a in args]
  return subprocess.run(
    [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *args],
    cwd=ROOT,
    env=env,
    input="",
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_bad_command_lines_end_in_one_line(tmp_path):
  assert len(BAD_COMMAND_LINES) >= 20
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = pool.map(
      lambda case: (case, _run(case[1], str(tmp_path / str(BAD_COMMAND_LINES.index(case))))),
      BAD_COMMAND_LINES,
    )
    failures = []
    for (name, _, expected), result in results:
      lines = [line for line in result.stderr.splitlines() if line.strip()]
      ok = (
        result.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error: ")
        and expected in lines[0]
        and "Traceback" not in result.stderr
      )
      if not ok:
        failures.append(f"{name}: exit {result.returncode}, stderr:\n{result.stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("module", ["demo", "demo_adapt", "speed", "wmt_ende", "lm1b", "gpt2"])
def test_every_experiment_module_gives_a_valid_config(module):
  from lm import config as lmc

  cfg = __import__(f"experiments.{module}", fromlist=["get_config"]).get_config()
  lmc.validate(cfg)
  assert cfg.data.source


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
