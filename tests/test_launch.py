"""Launchers: the TPU VM script's dry runs (the exact gcloud commands of a job's lifecycle), and
the SLURM script under a simulated SLURM step on this machine."""

import json
import os
import shlex
import subprocess

import numpy as np
import pytest

from tests.helpers import cluster_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = ["--name=wmt", "--zone=us-central2-b", "--dry_run"]


def _launch(*args):
  result = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *args],
    capture_output=True,
    text=True,
    timeout=60,
  )
  dry_run = result.returncode == 0 and "--dry_run" in args and "--help" not in args
  commands = [shlex.split(line) for line in result.stdout.splitlines()] if dry_run else []
  return result.returncode, commands, result


@pytest.mark.parametrize(
  "accelerator,runtime", [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite")]
)
def test_create_and_run_name_the_slice_all_workers_and_distributed(accelerator, runtime):
  code, commands, _ = _launch("create", *JOB, f"--accelerator_type={accelerator}", "--spot")
  assert code == 0 and commands == [
    [
      "gcloud", "compute", "tpus", "queued-resources", "create", "wmt", "--node-id=wmt",
      "--zone=us-central2-b", f"--accelerator-type={accelerator}", f"--runtime-version={runtime}",
      "--spot",
    ]
  ]  # fmt: skip
  job = ["--config=experiments/wmt_ende.py:big", "--workdir=gs://bucket/wmt big"]
  code, commands, _ = _launch("run", *JOB, "--", *job)
  assert code == 0 and len(commands) == 1
  ssh, remote = commands[0][:-1], commands[0][-1]
  assert ssh == [
    "gcloud", "compute", "tpus", "tpu-vm", "ssh", "wmt", "--zone=us-central2-b", "--worker=all"
  ]  # fmt: skip
  assert remote.startswith("--command=")
  words = shlex.split(remote.removeprefix("--command="))
  start = words.index("experiments.run")
  assert words[start - 2 : start] == [".venv/bin/python", "-m"]
  assert words[start + 1 : start + 4] == [*job, "--distributed"]  # quoting survives


def test_multislice_create_and_stop_cover_every_slice():
  code, commands, _ = _launch("create", *JOB, "--accelerator_type=v4-32", "--slices=2")
  assert code == 0 and "--node-count=2" in commands[0] and "--node-prefix=wmt" in commands[0]
  code, commands, _ = _launch("stop", *JOB, "--slices=2")
  assert code == 0 and [c[5] for c in commands] == ["wmt-0", "wmt-1"]
  assert all("--worker=all" in c and "pkill -TERM" in c[-1] for c in commands)


def test_setup_copies_the_tree_or_checks_out_a_ref_and_installs_on_every_worker():
  code, commands, _ = _launch("setup", *JOB)
  assert code == 0 and commands[0][0] == "tar" and "scp" in commands[1]
  assert "pip install" in commands[-1][-1] and "requirements.txt" in commands[-1][-1]
  code, commands, result = _launch("setup", *JOB, "--ref=v1.2")
  has_origin = subprocess.run(
    ["git", "-C", ROOT, "remote", "get-url", "origin"], capture_output=True
  )
  if has_origin.returncode == 0:
    assert code == 0 and "checkout --quiet v1.2" in commands[0][-1]
  else:  # a checkout without a remote has nothing the workers could clone
    assert code == 2 and "no git remote 'origin'" in result.stderr


@pytest.mark.parametrize(
  "args,message",
  [
    (["deploy", *JOB], "unknown subcommand 'deploy'"),
    (["create", *JOB], "--accelerator_type is required"),
    (["run", *JOB], "give the job's flags after --"),
    (["logs", "--zone=z"], "--name is required"),
    (["delete", *JOB, "--slices=0"], "--slices=0"),
  ],
)
def test_bad_launcher_arguments_fail_in_one_line(args, message):
  code, commands, result = _launch(*args)
  assert code == 2 and not commands
  assert result.stderr.startswith("error: ") and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_every_subcommand_has_help():
  for command in ("create", "setup", "run", "logs", "stop", "delete"):
    code, _, result = _launch(command, "--help")
    assert code == 0 and "--dry_run" in result.stdout


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one machine: SLURM_NTASKS copies of the command, each with its task ids.
while [[ $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$TASK_LOGS/task_$i.log" 2>&1 &
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
"""


def test_slurm_script_starts_processes_that_detect_the_job_from_slurm(tmp_path, cluster_reference):
  """2 simulated SLURM tasks find the coordinator, the count and their ids in SLURM's variables
  and train the cluster config with the losses of 1 process."""
  (tmp_path / "bin").mkdir()
  srun = tmp_path / "bin" / "srun"
  srun.write_text(FAKE_SRUN)
  srun.chmod(0o755)
  port = 10_000 + os.getpid() % 1000  # JAX derives the coordinator port from the job id
  env = {
    **os.environ,
    "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    "TASK_LOGS": str(tmp_path),
    "SLURM_JOB_ID": str(port),
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_NTASKS": "2",
    "SLURM_SUBMIT_DIR": ROOT,
    # 4 devices per task; LLVM at -O0, as in the test process (a tiny run: compiling dominates)
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
    "JAX_PLATFORMS": "cpu",
  }
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", *cluster_flags(train__total_steps=3)]
  result = subprocess.run(
    ["bash", os.path.join(ROOT, "launch", "gpu_slurm.sbatch"), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)]
  assert result.returncode == 0, "\n".join(log[-2000:] for log in logs)
  for i, log in enumerate(logs):
    assert f"process {i} of 2: 4 local devices" in log
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [row["loss"] for row in rows if "loss" in row]
  np.testing.assert_allclose(losses, [cluster_reference[s] for s in (1, 2, 3)], rtol=1e-5)
  # 8 devices over 2 processes
  assert "mesh {'stage': 1, 'data': 2, 'fsdp': 2, 'tensor': 2}" in logs[0]
