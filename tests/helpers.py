"""Tiny configs shared by the tests."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import websockets.sync.client

from lm import config as lmc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TASK_DEFAULTS = {
  "translation": lmc.translation_defaults,
  "lm": lmc.lm_defaults,
  "classify": lmc.classify_defaults,
}


def tiny_config(task: str = "translation", **model):
  cfg = TASK_DEFAULTS[task]()
  cfg.model.update(
    vocab_size=64,
    d_model=32,
    num_heads=4,
    mlp_dim=64,
    enc_layers=2,
    dec_layers=2,
    max_len=32,
    dropout_rate=0.0,
    label_smoothing=0.0,
    dtype="float32",
  )
  cfg.model.update(model)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.data.seq_len = 16
  cfg.train.update(global_batch_size=8, total_steps=10)
  cfg.optim.update(learning_rate=1e-2, schedule="constant", warmup_steps=0)
  return cfg


# The demo as the multi-process tests run it (tests/test_multihost.py, the SLURM launcher test):
# mesh (2, 2, 2) whether 1 process holds its 8 devices or 2 processes hold 4 each, ZeRO-3,
# dropout on, a checkpoint every 2 steps.
CLUSTER_OVERRIDES = {
  "mesh.data": 2,
  "mesh.fsdp": 2,
  "mesh.tensor": 2,
  "zero_stage": 3,
  "model.dropout_rate": 0.1,
  "train.log_every": 1,
  "checkpoint.every": 2,
  "data.eval_examples": 16,
  "eval.examples": 0,
  "eval.bleu": False,  # losses are compared; decoding is compared by test_multihost's modes test
}


def cluster_flags(**overrides) -> list[str]:
  """CLUSTER_OVERRIDES (and `overrides`, dots as __) as experiments.run flags."""
  values = {**CLUSTER_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return ["--config=experiments/demo.py:tiny", *(f"--config.{k}={v}" for k, v in values.items())]


def cluster_config(**overrides):
  """The config cluster_flags(**overrides) gives experiments.run."""
  from experiments import demo

  cfg = demo.get_config("tiny")
  values = {**CLUSTER_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
  for key, value in values.items():
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = value
  return cfg


def damage_largest_array_file(step_dir) -> None:
  """Flips a byte in every KiB of the largest array file of a checkpoint step's state (its
  parts are not all read back: one flipped byte can land where nothing reads it)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  for i in range(512, len(data), 1024):
    data[i] ^= 0xFF
  largest.write_bytes(bytes(data))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args, env=None):
  """`--mode=serve` in a subprocess and (the process, its base URL), once /healthz answers."""
  port = free_port()
  command = [sys.executable, "-m", "experiments.run", "--mode=serve", f"--port={port}", *args]
  proc = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
  try:
    while True:
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      assert time.time() < deadline, "the server did not start within 180 s"
      with contextlib.suppress(httpx.TransportError):
        if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
          break
      time.sleep(0.3)
    yield proc, url
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=30)


def chromium() -> str | None:
  for name in ("chromium", "chromium-browser"):
    path = shutil.which(name)
    if path:
      return path
  return None


class Page:
  """One headless Chromium tab driven over the DevTools protocol."""

  def __init__(self, browser: str, profile):
    port = free_port()
    self.proc = subprocess.Popen(
      [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        "--window-size=900,700",
        "about:blank",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
      with contextlib.suppress(httpx.TransportError):
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        pages = [t for t in targets if t["type"] == "page"]
        if pages:
          break
      assert time.time() < deadline, "Chromium did not open its debugging port"
      time.sleep(0.2)
    self.connection = contextlib.ExitStack()
    self.socket = self.connection.enter_context(
      websockets.sync.client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
    )
    self.next_id = 0

  def call(self, method: str, **params) -> dict:
    self.next_id += 1
    self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
    while True:
      message = json.loads(self.socket.recv(timeout=60))
      if message.get("id") == self.next_id:
        assert "error" not in message, message
        return message["result"]

  def js(self, expression: str):
    return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
      "value"
    )

  def wait_for(self, expression: str, timeout: float = 60):
    deadline = time.time() + timeout
    while not (value := self.js(expression)):
      assert time.time() < deadline, f"never true: {expression}"
      time.sleep(0.1)
    return value

  def close(self):
    self.connection.close()
    self.proc.kill()
    self.proc.wait(timeout=30)


def page_output(url: str, text: str, profile, choice: str | None = None) -> str:
  """What the service's page at `url` shows for `text` typed in a headless Chromium, with
  `choice` picked in its language menu (which must then be shown)."""
  page = Page(chromium(), profile)
  try:
    page.call("Page.navigate", url=url + "/")
    page.wait_for("document.getElementById('about').textContent.includes('model step')")
    if choice is not None:
      assert page.js("document.getElementById('lang').hidden") is False
      page.js(f"document.getElementById('lang').value = {json.dumps(choice)}")
    page.js("document.getElementById('input').focus()")
    page.call("Input.insertText", text=text)
    page.js("document.getElementById('go').click()")
    page.wait_for("document.getElementById('status').textContent")
    assert not page.js("document.getElementById('error').textContent")
    return page.js("document.getElementById('output').textContent")
  finally:
    page.close()


# Importing a command-line module and what its main imports takes seconds (experiments.run's
# ~10 s of CPU), most of a bad command line's time. One process imports them once and forks a
# child per command line: each child parses its flags afresh and exits through app.run as
# `python -m MODULE` would, its exit code and stderr its own. The fork is safe only with one
# thread and no jax backend in the parent: the runner checks both.
FORKING_RUNNER = """
import importlib, json, os, sys, threading, traceback
from absl import app
module, preload, jobs = json.loads(sys.stdin.read())
cli = importlib.import_module(module)
for name in preload:
  importlib.import_module(name)
assert threading.active_count() == 1, threading.enumerate()
if "jax" in sys.modules:
  from jax._src import xla_bridge
  assert not xla_bridge.backends_are_initialized()
parser = {"flags_parser": cli.parse_flags} if hasattr(cli, "parse_flags") else {}
for argv, err in jobs:
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      null, log = os.open(os.devnull, os.O_RDWR), os.open(err, os.O_WRONLY | os.O_CREAT)
      os.dup2(null, 0), os.dup2(null, 1), os.dup2(log, 2)
      sys.argv = [module, *argv]
      app.run(cli.main, **parser)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    except BaseException:
      traceback.print_exc()
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os._exit(code)
  print(os.waitpid(pid, 0)[1] >> 8, flush=True)
"""


# What experiments.run's main imports (after --distributed has set up the processes): a
# preload for its command lines, so that no child imports it again.
RUN_IMPORTS = ("lm.evaluate", "lm.inference", "lm.metrics", "lm.train")


def forked_command_lines(
  module: str, argvs: list[list[str]], logdir, preload: tuple[str, ...] = (), env=None
) -> list[tuple[int, str]]:
  """(exit code, stderr) of `python -m MODULE ARGV` for each argv, with an empty stdin, from
  children of one process that imported `module` and `preload` (FORKING_RUNNER)."""
  jobs = [(argv, os.path.join(str(logdir), f"{i}.stderr")) for i, argv in enumerate(argvs)]
  result = subprocess.run(
    [sys.executable, "-c", FORKING_RUNNER],
    cwd=ROOT,
    env=env,
    input=json.dumps([module, list(preload), jobs]),
    capture_output=True,
    text=True,
    timeout=600,
  )
  codes = result.stdout.split()
  assert result.returncode == 0 and len(codes) == len(argvs), result.stderr[-3000:]
  return [(int(code), open(err).read()) for code, (_, err) in zip(codes, jobs, strict=True)]
