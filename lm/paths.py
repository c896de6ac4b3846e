"""Where a run's files live: a local folder or a URL (gs://BUCKET/...) alike, through etils.epath,
the path layer orbax itself uses, so that every host of a pod reads and writes one workdir."""

from __future__ import annotations

import os

from etils import epath


def resolve(path: str | os.PathLike) -> epath.Path:
  """A local path made absolute; a URL (gs://..., s3://...) kept as it is."""
  text = os.fspath(path)
  return epath.Path(text if is_url(text) else os.path.abspath(text))


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)
