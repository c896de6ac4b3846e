"""The library's modules import downward only: no cycle, and inference loads no training loop."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
  return relative.removesuffix(".__init__")


def import_graph(package: str = "lm") -> dict[str, set[str]]:
  """module -> the package's modules it imports, at any depth of its source (function-level
  imports included), read from the source text."""
  modules = {}
  for directory, _, files in os.walk(os.path.join(ROOT, package)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        modules[_module_name(path)] = ast.parse(open(path).read())
  graph = {}
  for module, tree in modules.items():
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        targets.add(node.module)
        targets |= {f"{node.module}.{alias.name}" for alias in node.names}
    graph[module] = {t for t in targets if t in modules and t != module}
  return graph


def _find_cycle(graph):
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return path + [node, nxt]
      if nxt not in state and (found := visit(nxt, path + [node])):
        return found
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node, [])):
      return found
  return None


def test_library_import_graph_has_no_cycle():
  graph = import_graph()
  assert {"lm.layout", "lm.train", "lm.decode", "lm.evaluate", "lm.checkpoint"} <= set(graph)
  assert "lm.layout" in graph["lm.inference"] and "lm.checkpoint" in graph["lm.inference"]
  assert "lm.inference" in graph["lm.decode"]
  assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


TRAINING_MODULES = {"lm.train", "lm.train_step", "lm.grads", "lm.local_sgd", "lm.optim"}


def test_inference_modules_load_no_optimizer_and_no_train_step():
  """The optimizer and the train step stay out of decode and serve. (optax itself is loaded by
  flax.nnx, whose helpers import it: no module of ours does.)"""
  for module in ("lm.decode", "lm.serve"):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('lm.')))"
    out = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(eval(out))  # a printed list of names
    assert {module, "lm.layout", "lm.inference", "lm.checkpoint"} <= loaded
    assert not loaded & (TRAINING_MODULES | {"lm.evaluate"}), sorted(loaded & TRAINING_MODULES)
  graph = import_graph()
  assert not any("optax" in line for line in _import_lines("lm/layout.py", "lm/decode.py"))
  assert "lm.optim" in graph["lm.train_step"]  # the test's premise: this is where it comes in


def _import_lines(*paths):
  for path in paths:
    for line in open(os.path.join(ROOT, path)):
      if line.startswith(("import ", "from ")):
        yield line
