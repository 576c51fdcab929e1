"""A workdir on an S3 object store that runs offline: moto's S3 server.

`s3_store()` starts moto's S3 server (a real S3 REST endpoint on localhost,
in this process) with one bucket, and for its lifetime makes `s3://...`
paths work end to end:

  - epath (the project's path layer, and orbax's for its directories and
    JSON items): `S3Path`, an epath class whose backend speaks S3 through
    boto3. Object-store semantics: no directories (a mkdir writes an empty
    `key/` marker), no append, a rename is a copy and a delete.
  - orbax's arrays, which go through tensorstore's own kvstore drivers, not
    epath: orbax 0.12 routes only gs:// to a remote driver (any other path
    must be a local absolute one), so `_route_s3_to_tensorstore` sends
    s3:// to tensorstore's s3 driver pointed at the server, the one change
    a real S3 workdir would need from orbax.

Nothing here mocks a file call: every byte goes over HTTP to the server.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import posixpath

import boto3
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from etils.epath import register as epath_register
from etils.epath import stat_utils

BUCKET = "instructrl-test"
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1"}


def _split(path) -> tuple[str, str]:
  p = os.fspath(path)
  assert p.startswith("s3://"), p
  bucket, _, key = p[len("s3://"):].partition("/")
  return bucket, key.strip("/")


class _Upload(io.BytesIO):
  """A file opened for writing: one put_object on close (whole objects)."""

  def __init__(self, backend, bucket, key, initial=b""):
    super().__init__(initial)
    self.seek(0, io.SEEK_END)
    self._put = lambda body: backend.s3.put_object(Bucket=bucket, Key=key, Body=body)

  def close(self):
    if not self.closed:
      self._put(self.getvalue())
    super().close()


class S3Backend(epath_backend.Backend):
  """epath's backend interface over boto3 (one client, one endpoint)."""

  def __init__(self, client):
    self.s3 = client

  def keys(self, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in self.s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix):
      out += [o["Key"] for o in page.get("Contents", ())]
    return out

  def _get(self, bucket, key) -> bytes:
    try:
      return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except self.s3.exceptions.NoSuchKey:
      raise FileNotFoundError(f"s3://{bucket}/{key}") from None

  def _is_file(self, bucket, key) -> bool:
    if not key:
      return False
    try:
      self.s3.head_object(Bucket=bucket, Key=key)
      return True
    except self.s3.exceptions.ClientError:
      return False

  def open(self, path, mode):
    bucket, key = _split(path)
    if "r" in mode:
      data = self._get(bucket, key)
      return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())
    append = "a" in mode and self._is_file(bucket, key)
    initial = self._get(bucket, key) if append else b""
    f = _Upload(self, bucket, key, initial)
    return f if "b" in mode else io.TextIOWrapper(f, encoding="utf-8")

  def exists(self, path):
    bucket, key = _split(path)
    return self._is_file(bucket, key) or self.isdir(path)

  def isdir(self, path):
    bucket, key = _split(path)
    prefix = key + "/" if key else ""
    return bool(self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix,
                                        MaxKeys=1).get("KeyCount"))

  def listdir(self, path):
    bucket, key = _split(path)
    prefix = key + "/" if key else ""
    names = {k[len(prefix):].split("/", 1)[0] for k in self.keys(bucket, prefix)}
    return sorted(n for n in names if n)

  def _tree(self, path) -> tuple[set, set]:
    """(directories, files) under `path`, as full s3:// paths."""
    bucket, key = _split(path)
    prefix = key + "/" if key else ""
    dirs, files = set(), set()
    for k in self.keys(bucket, prefix):
      parts = k[len(prefix):].split("/")
      for i in range(1, len(parts)):
        dirs.add(f"s3://{bucket}/{prefix}{'/'.join(parts[:i])}")
      if parts[-1]:
        files.add(f"s3://{bucket}/{k}")
    return dirs, files

  def glob(self, path):
    p = os.fspath(path)
    root = p[:min([p.index(c) for c in "*?[" if c in p] or [len(p)])]
    root = root.rsplit("/", 1)[0]
    dirs, files = self._tree(root)
    return sorted(x for x in dirs | files if fnmatch.fnmatchcase(x, p))

  def walk(self, path, *, top_down=True, on_error=None):
    del on_error
    top = os.fspath(path).rstrip("/")
    dirs, files = self._tree(top)
    out = []
    for d in sorted({top} | dirs):
      children = lambda s: sorted(posixpath.basename(x) for x in s
                                  if posixpath.dirname(x) == d)
      out.append((d, children(dirs), children(files)))
    return out if top_down else out[::-1]

  def makedirs(self, path, *, exist_ok=False, mode=None):
    del mode
    if not exist_ok and self.exists(path):
      raise FileExistsError(path)
    bucket, key = _split(path)
    if key:
      self.s3.put_object(Bucket=bucket, Key=key + "/", Body=b"")

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self.makedirs(path, exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    bucket, key = _split(path)
    for k in self.keys(bucket, key + "/"):
      self.s3.delete_object(Bucket=bucket, Key=k)

  def remove(self, path):
    bucket, key = _split(path)
    if not self._is_file(bucket, key):
      raise FileNotFoundError(os.fspath(path))
    self.s3.delete_object(Bucket=bucket, Key=key)

  def rename(self, path, dst):
    """Copy and delete, object by object: an object store has no rename."""
    bucket, key = _split(path)
    dbucket, dkey = _split(dst)
    moves = ([(key, dkey)] if self._is_file(bucket, key) else
             [(k, dkey + k[len(key):]) for k in self.keys(bucket, key + "/")])
    if not moves:
      raise FileNotFoundError(os.fspath(path))
    for src, new in moves:
      self.s3.copy_object(Bucket=dbucket, Key=new,
                          CopySource={"Bucket": bucket, "Key": src})
      self.s3.delete_object(Bucket=bucket, Key=src)

  replace = rename

  def copy(self, path, dst, overwrite):
    if self.exists(dst) and not overwrite:
      raise FileExistsError(os.fspath(dst))
    bucket, key = _split(path)
    dbucket, dkey = _split(dst)
    self.s3.copy_object(Bucket=dbucket, Key=dkey,
                        CopySource={"Bucket": bucket, "Key": key})

  def stat(self, path):
    bucket, key = _split(path)
    head = self.s3.head_object(Bucket=bucket, Key=key)
    return stat_utils.StatResult(
        is_directory=False, length=head["ContentLength"],
        mtime=int(head["LastModified"].timestamp()), owner=None, group=None,
        mode=None)


class S3Path(gpath.PosixGPath):
  """`s3://bucket/key` on the test server (epath's own s3:// needs s3fs)."""

  backend: S3Backend | None = None

  @property
  def _backend(self):
    return type(self).backend


@contextlib.contextmanager
def _route_s3_to_tensorstore(endpoint: str):
  """orbax's kvstore for an s3:// directory: tensorstore's s3 driver."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top
  saved = (ts_utils._normalize_path, ts_utils._use_gcs_driver,
           gcs_utils.get_kvstore_for_gcs)
  normalize, use_gcs, gcs_kvstore = saved

  def kvstore(path: str) -> dict:
    if not path.startswith("s3://"):
      return gcs_kvstore(path)
    bucket, key = _split(path)
    return {"driver": "s3", "bucket": bucket, "path": key + "/",
            "endpoint": endpoint, "aws_region": _CREDENTIALS["AWS_DEFAULT_REGION"],
            "aws_credentials": {"type": "environment"}}

  ts_utils._normalize_path = lambda p: (normalize(p).replace("s3:/", "s3://", 1)
                                        if p.startswith("s3://") else normalize(p))
  ts_utils._use_gcs_driver = lambda d: d.startswith("s3://") or use_gcs(d)
  gcs_utils.get_kvstore_for_gcs = kvstore
  try:
    yield
  finally:
    (ts_utils._normalize_path, ts_utils._use_gcs_driver,
     gcs_utils.get_kvstore_for_gcs) = saved


@contextlib.contextmanager
def s3_store():
  """Yields the S3Backend of a fresh moto S3 server with bucket `BUCKET`."""
  from moto.server import ThreadedMotoServer  # pylint: disable=g-import-not-at-top
  logging.getLogger("werkzeug").setLevel(logging.ERROR)  # A line per request.
  old_env = {k: os.environ.get(k) for k in _CREDENTIALS}
  os.environ.update(_CREDENTIALS)
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  old_cls = epath_register._URI_PREFIXES_TO_CLS.get("s3://")
  try:
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    backend = S3Backend(boto3.client("s3", endpoint_url=endpoint))
    backend.s3.create_bucket(Bucket=BUCKET)
    S3Path.backend = backend
    epath.register_path_cls("s3://")(S3Path)
    with _route_s3_to_tensorstore(endpoint):
      yield backend
  finally:
    epath_register._URI_PREFIXES_TO_CLS["s3://"] = old_cls
    S3Path.backend = None
    server.stop()
    for k, v in old_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
