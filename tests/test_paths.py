"""gs:// workdirs: every file a run reads or writes goes through etils.epath (no network: epath's
mock backend maps gs://BUCKET/... onto a local folder, recording nothing under the cwd)."""

import contextlib
import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from lm import checkpoint, inference, metrics
from lm.data import pipeline
from tests.helpers import tiny_config


@contextlib.contextmanager
def _bucket(root):
  """gs://... paths served from `root`, through epath's own backend interface."""

  def local(path):
    text = os.fspath(path)
    return os.path.join(root, text[len("gs://") :]) if text.startswith("gs://") else text

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def glob(fn, pattern):
    return [p.replace(f"{root}/", "gs://", 1) for p in fn(local(pattern))]

  with epath_testing.mock_epath(
    open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
    rmtree=one, stat=one, walk=one, glob=glob, rename=two, replace=two, copy=two,
  ):  # fmt: skip
    yield


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  root, cwd = tmp_path / "storage", tmp_path / "cwd"
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with _bucket(str(root)):
    yield root
  assert not os.listdir(cwd), "a gs:// path was written as a local folder"


def test_tokenizer_metrics_and_config_of_a_gs_workdir_land_in_the_bucket(bucket, monkeypatch):
  cfg = tiny_config("translation")
  cfg.data.update(source="synthetic:demo", tokenizer_sample=500)
  pipeline.load(cfg, "gs://b/run")
  assert (bucket / "b" / "run" / "tokenizer.model").stat().st_size > 1000
  lines = []
  pipeline.load(cfg, "gs://b/run", lines.append)
  assert "tokenizer: reusing gs://b/run/tokenizer.model" in lines

  written = []  # TensorBoard's own gs:// writer needs google-cloud-storage: record the path
  monkeypatch.setattr(metrics, "SummaryWriter", lambda path: written.append(path) or _NoWriter())
  log = metrics.Logger("gs://b/run", cfg)
  log.scalars(3, {"loss": 1.5})
  log.close()
  assert written == ["gs://b/run/tb"]
  rows = (bucket / "b" / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r) for r in rows] == [{"step": 3, "loss": 1.5}]
  assert json.loads((bucket / "b" / "run" / "config.json").read_text())["task"] == "translation"
  log = metrics.Logger("gs://b/run", cfg)  # a resumed run: the object is rewritten, not lost
  log.scalars(4, {"loss": 1.25})
  log.close()
  assert len((bucket / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoints_and_exports_of_a_gs_workdir_are_named_by_url(bucket, monkeypatch):
  # orbax asks the GCS API (google-cloud-storage, the network) about the bucket's namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  checkpoints = checkpoint.Checkpointer("gs://b/run")
  try:
    assert str(checkpoints.path(12)) == "gs://b/run/checkpoints/12"
    assert checkpoints.latest_step() is None
  finally:
    checkpoints.close()
  meta = bucket / "b" / "export" / "meta"
  meta.mkdir(parents=True)
  (meta / "metadata").write_text(json.dumps({"step": 5}))
  assert inference.source_meta("gs://b/export") == {"step": 5}
  assert isinstance(checkpoint.paths.resolve("gs://b/export"), epath.Path)


class _NoWriter:
  def add_scalar(self, *args):
    pass

  def flush(self):
    pass

  def close(self):
    pass
