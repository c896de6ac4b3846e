"""8 CPU host devices, so that meshes like (2, 2, 2) are real. Must run before jax imports."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# A persistent compilation cache for this session, shared with the processes the tests start
# (through the environment): identical steps built anew (a run and its resume, one config in
# several tests and processes) compile once. jax writes entries from process 0 of a job only,
# and an entry a killed process left half-written fails to read with a warning and compiles
# again.
import atexit
import fcntl
import json
import shutil
import tempfile

import jax
import pytest

# LLVM at -O0 in this process: its tiny models spend their time compiling, not running
# (measured: the 2x2x2 translation cases of test_parallel 36 -> 24 s). Of the processes the tests
# start, the multi-process jobs ask for -O0 too (tests/test_multihost.py, test_launch.py); the
# others train and serve for longer and keep the default.
_flags = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = _flags + " --xla_backend_optimization_level=0"
jax.devices()  # the backend reads XLA_FLAGS once, here
os.environ["XLA_FLAGS"] = _flags

# One directory for the whole run (the cache, the workers' locks): pytest-xdist's workers
# inherit it from the process that starts them, which alone removes it at exit.
_run = os.environ.get("ZEROLM_TEST_RUN_DIR")
if not _run:
  _run = os.environ["ZEROLM_TEST_RUN_DIR"] = tempfile.mkdtemp(prefix="zerolm-tests-")
  atexit.register(shutil.rmtree, _run, ignore_errors=True)
_cache = os.path.join(_run, "xla-cache")
os.environ.update(
  JAX_COMPILATION_CACHE_DIR=_cache,
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto`: a worker a core, at most 4. Each holds 8 host devices and some tests start
  several processes of their own, so more workers buy little and cost memory."""
  return max(1, min(os.cpu_count() or 1, 4))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """A readers-writer lock across pytest-xdist's workers, held over each test's whole setup,
  call and teardown: shared by every test, exclusive for a test marked `alone` (it asserts on
  wall-clock time), so no other worker's compile slows it. A turnstile stops new shared holders
  while an exclusive one waits."""
  if not hasattr(item.config, "workerinput"):  # one process: nothing runs beside a test
    yield
    return
  with (
    open(os.path.join(_run, "alone.lock"), "a") as lock,
    open(os.path.join(_run, "turnstile.lock"), "a") as gate,
  ):
    fcntl.flock(gate, fcntl.LOCK_EX)
    if item.get_closest_marker("alone"):
      fcntl.flock(lock, fcntl.LOCK_EX)
      fcntl.flock(gate, fcntl.LOCK_UN)
    else:
      fcntl.flock(gate, fcntl.LOCK_UN)
      fcntl.flock(lock, fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cluster_reference(tmp_path_factory) -> dict[int, float]:
  """step -> loss of the cluster config (tests/helpers.py) trained uninterrupted for 12 steps by
  this process on its 8 devices: what every multi-process run of it must give."""
  from lm import train
  from tests.helpers import cluster_config

  workdir = tmp_path_factory.mktemp("cluster_reference")
  train.train(cluster_config(train__total_steps=12, checkpoint__every=0), str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


@pytest.fixture(scope="session")
def trained_lm_workdir(tmp_path_factory):
  """The demo LM (experiments/demo.py:lm_tiny, 20 steps) trained on mesh (2, 2, 2); it serves
  (on fsdp 8, as inference modes lay a model out without --config) from 8 decode slots: what
  the LM service's tests read."""
  from experiments import demo
  from lm import train

  workdir = tmp_path_factory.mktemp("demo_lm")
  cfg = demo.get_config("lm_tiny")
  cfg.data.update(tokenizer_sample=2000, eval_examples=16)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.serve.update(slots=8, prefill_rows=8)
  train.train(cfg, str(workdir))
  return workdir


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """The demo trained 20 steps (fsdp over 8 devices): what decoding, eval and serving read."""
  from experiments import demo
  from lm import train

  workdir = tmp_path_factory.mktemp("demo")
  cfg = demo.get_config("tiny")
  cfg.train.total_steps = 20
  cfg.data.update(tokenizer_sample=2000, eval_examples=16)
  cfg.mesh.update(data=1, fsdp=8)
  train.train(cfg, str(workdir))
  return workdir
