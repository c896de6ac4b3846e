"""Peak host memory of importing a Hugging Face checkpoint (hf:DIR) onto a mesh.

  python -m experiments.bench_hf_load --meshes=1x8x1,1x1x1 --before=/tmp/before --verify

Writes a random Llama checkpoint (LlamaForCausalLM's tensor names and shapes, float32, ~100 MB
safetensors files with model.safetensors.index.json, a small SentencePiece tokenizer) with numpy
alone, one tensor at a time; by default hidden 768, 12 heads / 4 KV heads of 64, intermediate
2048, 8 layers, vocab 32000, untied: 99.5M parameters, 398 MB (380 MiB), the largest tensors the
embedding and the output head (94 MiB each). --verify: transformers loads it (another process)
with no missing, unexpected or mismatched keys. Then, for each checkout (--before, e.g.
`git archive <commit> | tar -x -C /tmp/before`, then this one) and mesh (data x fsdp x tensor,
ZeRO-3), a fresh process with 8 CPU devices imports it through `inference.restore_export` and
reports: its RSS right before the load (jax, lm and the tokenizer loaded: the baseline), VmHWM
after it (the process's peak RSS; the imports peak lower), a 2 ms sampler's peak of the
anonymous and file-backed parts (mmapped checkpoint pages are the latter), the bytes of its
shards, its RSS after the load and once everything is freed (malloc_trim'd: a leak shows
there), and bytes read with read() (mmapped reads do not count). On CPU the devices' buffers
are host memory, so the floor of the peak is this process's shards (the whole model, one host);
the overhead is what the load costs beyond them, to be held to the largest checkpoint tensor.
--naive adds a process that reads every file into a dict first (safetensors.numpy.load_file)
and imports from that.

Measured (2 CPU cores shared with other jobs, files in the page cache; before = eb58568; MiB):
                          peak - baseline  overhead over shards  / largest tensor  file-backed
  before (1,8,1) ZeRO-3        1060              681                 7.26             380
  before (1,1,1)                981              601                 6.41             381
  after  (1,8,1) ZeRO-3         489              109                 1.17               0
  after  (1,1,1)                488              108                 1.16               0
  naive  (1,8,1) ZeRO-3         764              385                 4.11               0
Before: safe_open's mmap kept every page read (the whole model) in RSS until the end, and the
output head was converted through three full copies (read, np.pad, the transpose) while
make_array_from_callback held all of a parameter's host shards for its copy to the devices.
After: one read tensor (the output head, kept for its 8 shards), one shard in flight and one
4 MiB read chunk (each chunk read from its own safe_open, so no mapping outlives it). A reader
of our own with plain file reads measured 99 MiB (1.05x); safetensors' API is kept instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

_DIR = flags.DEFINE_string("dir", None, "Write the checkpoint here (kept) instead of a temp dir.")
_HIDDEN = flags.DEFINE_integer("hidden", 768, "hidden_size")
_LAYERS = flags.DEFINE_integer("layers", 8, "num_hidden_layers")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 2048, "intermediate_size")
_HEADS = flags.DEFINE_integer("heads", 12, "num_attention_heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "num_key_value_heads")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocab_size (embedding rows)")
_FILE_MB = flags.DEFINE_integer("file_mb", 100, "Safetensors files are cut at about this size.")
_MESHES = flags.DEFINE_string("meshes", "1x8x1,1x1x1", "data x fsdp x tensor, comma-separated.")
_NAIVE = flags.DEFINE_bool("naive", True, "Also measure reading every file first, on the first.")
_VERIFY = flags.DEFINE_bool(
  "verify", False, "Check (in another process) that transformers loads it with no missing keys."
)
_BEFORE = flags.DEFINE_string(
  "before", "", "Another checkout to measure first, e.g. `git archive <commit> | tar -x -C DIR`."
)
_DEVICES = 8  # CPU devices in every measured process, whatever its mesh uses

# Run in a fresh process from the checkout's root: directory, mesh, naive (0/1).
_CHILD = r"""
import ctypes, gc, json, os, sys, threading, time
import jax, numpy as np, safetensors.numpy
from lm import inference
from lm.checkpoint import meta_config
from lm.hf import models as hf_models, weights  # noqa: F401  (imported before the baseline)

directory, mesh, naive = sys.argv[1], tuple(map(int, sys.argv[2].split("x"))), sys.argv[3] == "1"
PAGE = os.sysconf("SC_PAGE_SIZE")

def status():
  out = {}
  for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
      out[key] = int(value.split()[0]) * 1024
  return out

class Sampler(threading.Thread):  # VmHWM has no anon/file split and cannot be reset
  def __init__(self):
    super().__init__(daemon=True)
    self.fd, self.stop = os.open("/proc/self/statm", os.O_RDONLY), threading.Event()
    self.rss = self.anon = self.file_at_peak = 0
  def run(self):
    while not self.stop.is_set():
      resident, shared = map(int, os.pread(self.fd, 256, 0).split()[1:3])  # shared = file + shmem
      if resident * PAGE > self.rss:
        self.rss, self.file_at_peak = resident * PAGE, shared * PAGE
      self.anon = max(self.anon, (resident - shared) * PAGE)
      time.sleep(0.002)

spec = "hf:" + directory
cfg = meta_config(inference.source_meta(spec))
cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
cfg.zero_stage = 3
devices = jax.devices()[: int(np.prod(mesh))]
jax.block_until_ready(jax.device_put(np.zeros(8), devices[0]))  # the CPU client up
gc.collect()
before = status()
rchar = lambda: int(dict(line.split(": ") for line in open("/proc/self/io"))["rchar"])
read = rchar()
sampler = Sampler()
sampler.start()
start = time.perf_counter()
report = {}
if naive:  # every tensor in one dict first, then the same import reading from it
  index = json.load(open(os.path.join(directory, weights.INDEX_FILE)))["weight_map"]
  tensors = {}
  for file in sorted(set(index.values())):
    tensors.update(safetensors.numpy.load_file(os.path.join(directory, file)))
  report["read_all"] = status()
  weights.CheckpointFiles.read = lambda self, name: tensors[name]
layout, params, _, _ = inference.restore_export(spec, devices, cfg)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
sampler.stop.set()
sampler.join()
after = status()
leaves = jax.tree.leaves(params)
report.update(
  before=before, after=after, seconds=seconds, sampled_rss=sampler.rss,
  sampled_anon=sampler.anon, file_at_peak=sampler.file_at_peak,
  shards=sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
  params=sum(x.nbytes for x in leaves), largest_param=max(x.nbytes for x in leaves),
  read=rchar() - read,
)
del params, layout, leaves
if naive:
  del tensors
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks: return them, to see leaks
report["freed"] = status()
print("REPORT " + json.dumps(report))
"""


def llama_config(vocab: int) -> dict:
  d, h = _HIDDEN.value, _HEADS.value
  return dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=vocab,
    hidden_size=d,
    intermediate_size=_INTERMEDIATE.value,
    num_hidden_layers=_LAYERS.value,
    num_attention_heads=h,
    num_key_value_heads=_KV_HEADS.value,
    head_dim=d // h,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="float32",
  )


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """LlamaForCausalLM's state dict (untied), in its order: name -> shape."""
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}"
    shapes.update(
      {
        f"{p}.self_attn.q_proj.weight": (q, d),
        f"{p}.self_attn.k_proj.weight": (kv, d),
        f"{p}.self_attn.v_proj.weight": (kv, d),
        f"{p}.self_attn.o_proj.weight": (d, q),
        f"{p}.mlp.gate_proj.weight": (f, d),
        f"{p}.mlp.up_proj.weight": (f, d),
        f"{p}.mlp.down_proj.weight": (d, f),
        f"{p}.input_layernorm.weight": (d,),
        f"{p}.post_attention_layernorm.weight": (d,),
      }
    )
  shapes["model.norm.weight"] = (d,)
  shapes["lm_head.weight"] = (v, d)
  return shapes


def write_checkpoint(directory: str) -> dict[str, tuple[int, ...]]:
  """config.json, a tokenizer and random float32 weights in ~--file_mb safetensors files, each
  tensor made with numpy (no torch model, which would hold them all); the shapes."""
  import numpy as np
  import safetensors.numpy

  from tests import hf_fixtures

  config = llama_config(_VOCAB.value)
  shapes = llama_shapes(config)
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index_path):  # --dir from an earlier run: kept if it is this model
    with open(os.path.join(directory, "config.json")) as f:
      if json.load(f) == config:
        return shapes
  hf_fixtures.llama_tokenizer(directory)  # 400 ids, bos 1, eos 2; rewrites config.json below
  hf_fixtures.write_json(os.path.join(directory, "config.json"), config)
  size = lambda shape: math.prod(shape) * 4
  files, current, total = [], [], 0
  for name, shape in shapes.items():
    if current and total + size(shape) > _FILE_MB.value << 20:
      files.append(current)
      current, total = [], 0
    current.append(name)
    total += size(shape)
  files.append(current)
  rng = np.random.default_rng(0)
  weight_map = {}
  for k, names in enumerate(files):
    file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
    arrays = {}
    for name in names:
      x = rng.standard_normal(shapes[name], dtype=np.float32)
      x *= 0.02 if len(shapes[name]) > 1 else 1.0
      arrays[name] = x
      weight_map[name] = file
    safetensors.numpy.save_file(arrays, os.path.join(directory, file), {"format": "pt"})
    del arrays
  index = {"metadata": {"total_size": sum(map(size, shapes.values()))}, "weight_map": weight_map}
  hf_fixtures.write_json(index_path, index)
  return shapes


def verify(directory: str) -> None:
  code = (
    "import sys, transformers\n"
    "_, info = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], "
    "output_loading_info=True)\n"
    "bad = {k: v for k, v in info.items() if v}\n"
    "print('transformers loads it:', bad or 'no missing, unexpected or mismatched keys')\n"
    "sys.exit(1 if bad else 0)\n"
  )
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  subprocess.run([sys.executable, "-c", code, directory], check=True, env=env)


def measure(code: str, directory: str, mesh: str, naive: bool) -> dict:
  """One fresh process on checkout `code`: its report."""
  env = {
    **os.environ,
    "PYTHONPATH": code,
    "JAX_PLATFORMS": "cpu",
    "HF_HUB_OFFLINE": "1",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES}",
  }
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, directory, mesh, str(int(naive))],
    cwd=code,
    env=env,
    stdout=subprocess.PIPE,
    check=True,
  ).stdout.decode()
  return json.loads(out.split("REPORT ", 1)[1])


def main(argv):
  del argv
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  directory = _DIR.value or tempfile.mkdtemp(prefix="bench_hf_load_")
  os.makedirs(directory, exist_ok=True)
  try:
    shapes = write_checkpoint(directory)
    mib = lambda n: n / 2**20
    model = sum(math.prod(s) for s in shapes.values()) * 4
    largest = max(math.prod(s) for s in shapes.values()) * 4
    c = llama_config(_VOCAB.value)
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    print(
      f"checkpoint {directory}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
      f"intermediate {c['intermediate_size']}, heads {c['num_attention_heads']}/"
      f"{c['num_key_value_heads']} of {c['head_dim']}, vocab {c['vocab_size']}, untied; "
      f"{model / 4e6:.1f}M parameters, {model / 1e6:.0f} MB = {mib(model):.0f} MiB float32 in "
      f"{len(files)} files; largest tensor {mib(largest):.0f} MiB",
      flush=True,
    )
    if _VERIFY.value:
      verify(directory)
    codes = ([("before", _BEFORE.value)] if _BEFORE.value else []) + [("after", here)]
    meshes = _MESHES.value.split(",")
    runs = [(name, code, mesh, False) for name, code in codes for mesh in meshes]
    if _NAIVE.value:
      runs.append(("after", here, meshes[0], True))
    header = (
      "| code | run | model MiB | largest tensor MiB | shards MiB | baseline RSS MiB "
      "| peak RSS MiB | peak - baseline | overhead over shards | overhead / largest "
      "| anon peak - baseline | file-backed growth at peak | RSS after | RSS freed | read() MiB "
      "| load s |"
    )
    rows = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for name, code, mesh, naive in runs:
      r = measure(code, directory, mesh, naive)
      base, peak = r["before"]["VmRSS"], r["after"]["VmHWM"]
      over = peak - base - r["shards"]
      run = f"({mesh.replace('x', ',')}) ZeRO-3" + (", naive: load_file first" if naive else "")
      rows.append(
        f"| {name} | {run} | {mib(model):.0f} | {mib(largest):.0f} | {mib(r['shards']):.0f} "
        f"| {mib(base):.0f} | {mib(peak):.0f} | {mib(peak - base):.0f} | {mib(over):.0f} "
        f"| {over / largest:.2f} | {mib(r['sampled_anon'] - r['before']['RssAnon']):.0f} "
        f"| {mib(r['file_at_peak'] - r['before']['RssFile']):.0f} "
        f"| {mib(r['after']['VmRSS']):.0f} | {mib(r['freed']['VmRSS']):.0f} "
        f"| {mib(r['read']):.0f} | {r['seconds']:.1f} |"
      )
      print(f"{name} {run}: {json.dumps(r)}", flush=True)
    print("\n".join(rows))
  finally:
    if not _DIR.value:
      shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
