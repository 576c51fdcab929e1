"""The safetensors format, read and written without torch or `safetensors`.

A file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte range; optional "__metadata__") and the raw little-endian
bytes. Reading memory-maps the file, so converting a large checkpoint touches
only the slices each device needs.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from instructrl.data.common import DataError

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_CODES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> read-only memory-mapped array, from one .safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
      raise DataError(path, "not a safetensors file (bad header length)")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise DataError(path, "not a safetensors file (header is not JSON)") from None
  data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info.get("dtype") not in _ST_DTYPES:
      raise DataError(path, f"tensor {name!r} has unsupported dtype "
                      f"{info.get('dtype')!r}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize or end > size - 8 - n:
      raise DataError(path, f"tensor {name!r} has a bad byte range (a truncated "
                      "file?)")
    if end == begin:
      out[name] = np.zeros(shape, dtype)
    else:
      out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` as one .safetensors file (atomically)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _ST_CODES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {a.dtype}")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": _ST_CODES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = metadata
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # The format aligns the data to 8 bytes.
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)


def write_checkpoint(path: str, tensors: dict[str, np.ndarray],
                     max_shard_bytes: int | None = None) -> None:
  """model.safetensors, or past `max_shard_bytes` (default 5 GB, as
  transformers') model-0000i-of-0000n.safetensors plus the index mapping
  each tensor to its file, which `from_pretrained` reads."""
  limit = max_shard_bytes or 5 * 10**9
  shards, size = [{}], 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if shards[-1] and size + nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  if len(shards) == 1:
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(path, name), shard, {"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
  total = sum(np.asarray(t).nbytes for t in tensors.values())
  index = os.path.join(path, "model.safetensors.index.json")
  with open(index + ".tmp", "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
              indent=2, sort_keys=True)
  os.replace(index + ".tmp", index)


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a HF directory (one file or an index of shards)."""
  single = os.path.join(path, "model.safetensors")
  index = single + ".index.json"
  if os.path.exists(single):
    return read_safetensors(single), single
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(index, f"not a safetensors index ({e!r})") from None
    tensors = {}
    for name in sorted(set(weight_map.values())):
      shard = os.path.join(path, name)
      if not os.path.exists(shard):
        raise DataError(index, f"names {name!r}, which does not exist")
      tensors.update(read_safetensors(shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise DataError(index, f"maps {missing[0]!r} to a file that lacks it")
    return tensors, index
  if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
    raise DataError(path, "only pickle weights (*.bin); convert them to "
                    "safetensors (pickle is never loaded)")
  raise DataError(path, "no model.safetensors or model.safetensors.index.json")
