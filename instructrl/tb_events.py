"""TensorBoard event files without TensorFlow, for `instructrl.metrics`.

Written by hand: TFRecord framing (length, masked CRC32C of length, data,
masked CRC32C of data) around `Event` protos encoded with the few protobuf
wire-format rules they need. Only scalars and text.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

# --- CRC32C (Castagnoli), as TFRecord needs. ---------------------------------


def _crc_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # reflected polynomial
    table.append(c)
  return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
  crc ^= 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# --- Protobuf wire format: just what Event/Summary need. ---------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  n &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint(field << 3 | wire)


def _int_field(field: int, n: int) -> bytes:
  return _key(field, _VARINT) + _varint(n)


def _double_field(field: int, x: float) -> bytes:
  return _key(field, _I64) + struct.pack("<d", x)


def _float_field(field: int, x: float) -> bytes:
  return _key(field, _I32) + struct.pack("<f", x)


def _bytes_field(field: int, data: bytes | str) -> bytes:
  if isinstance(data, str):
    data = data.encode("utf-8")
  return _key(field, _LEN) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int, *,
                 file_version: str | None = None,
                 summary: bytes | None = None) -> bytes:
  """Event{wall_time=1: double, step=2: int64, file_version=3, summary=5}."""
  out = _double_field(1, wall_time) + _int_field(2, step)
  if file_version is not None:
    out += _bytes_field(3, file_version)
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


def scalar_summary(scalars: Mapping[str, float]) -> bytes:
  """Summary{repeated Value value=1}, Value{tag=1, simple_value=2: float}."""
  return b"".join(
      _bytes_field(1, _bytes_field(1, tag) + _float_field(2, float(v)))
      for tag, v in scalars.items())


def text_summary(tag: str, text: str) -> bytes:
  """A string tensor for TensorBoard's text plugin (markdown)."""
  plugin_data = _bytes_field(1, "text")  # PluginData{plugin_name=1}
  # SummaryMetadata{plugin_data=1, data_class=4: DATA_CLASS_TENSOR=2}.
  metadata = _bytes_field(1, plugin_data) + _int_field(4, 2)
  # TensorProto{dtype=1: DT_STRING=7, tensor_shape=2: scalar, string_val=8}.
  tensor = _int_field(1, 7) + _bytes_field(2, b"") + _bytes_field(8, text)
  value = (_bytes_field(1, tag) + _bytes_field(8, tensor)
           + _bytes_field(9, metadata))
  return _bytes_field(1, value)


class EventFileWriter:
  """Appends TFRecord-framed Events to one new file in `logdir`."""

  def __init__(self, logdir: str | os.PathLike):
    os.makedirs(logdir, exist_ok=True)
    # TF's naming, pid included so a quick restart never reuses a file.
    name = (f"events.out.tfevents.{int(time.time())}."
            f"{socket.gethostname()}.{os.getpid()}")
    self.path = os.path.join(os.fspath(logdir), name)
    self._f = open(self.path, "ab")
    self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    self._f.write(tfrecord(event))
    self._f.flush()

  def scalars(self, step: int, scalars: Mapping[str, float],
              wall_time: float | None = None) -> None:
    if scalars:
      self._write(encode_event(wall_time or time.time(), step,
                               summary=scalar_summary(scalars)))

  def text(self, step: int, tag: str, text: str) -> None:
    self._write(encode_event(time.time(), step,
                             summary=text_summary(tag, text)))

  def close(self) -> None:
    self._f.close()
