"""Tests for instructrl.metrics: JSON lines, hand-written TensorBoard files
(checked by an independent decoder, and by TensorBoard when installed),
progress line and the NaN guard."""
import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import metrics as metrics_lib


# --- An independent reader: bitwise CRC32C and a tiny protobuf decoder. ---


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
  rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
  return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _records(path):
  with open(path, "rb") as f:
    buf = f.read()
  pos = 0
  while pos < len(buf):
    header = buf[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    (len_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    assert _unmask(len_crc) == _crc32c_bitwise(header)
    data = buf[pos + 12:pos + 12 + n]
    (data_crc,) = struct.unpack("<I", buf[pos + 12 + n:pos + 16 + n])
    assert _unmask(data_crc) == _crc32c_bitwise(data)
    yield data
    pos += 16 + n
  assert pos == len(buf)


def _fields(msg: bytes):
  """[(field number, value)]: ints for varint, bytes for fixed and length."""
  out, pos = [], 0
  def varint():
    nonlocal pos
    shift = result = 0
    while True:
      b = msg[pos]
      pos += 1
      result |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return result
  while pos < len(msg):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      out.append((field, varint()))
    elif wire == 1:
      out.append((field, msg[pos:pos + 8]))
      pos += 8
    elif wire == 5:
      out.append((field, msg[pos:pos + 4]))
      pos += 4
    elif wire == 2:
      n = varint()
      out.append((field, msg[pos:pos + n]))
      pos += n
    else:
      raise AssertionError(f"unexpected wire type {wire}")
  return out


def _decode_event(data: bytes) -> dict:
  ev = {"values": {}, "texts": {}}
  for field, v in _fields(data):
    if field == 1:
      ev["wall_time"] = struct.unpack("<d", v)[0]
    elif field == 2:
      ev["step"] = v - (1 << 64) if v >= 1 << 63 else v
    elif field == 3:
      ev["file_version"] = v.decode()
    elif field == 5:
      for _, value in _fields(v):
        f = dict(_fields(value))
        tag = f[1].decode()
        if 2 in f:
          ev["values"][tag] = struct.unpack("<f", f[2])[0]
        else:
          tensor = dict(_fields(f[8]))
          assert tensor[1] == 7  # DT_STRING
          assert dict(_fields(dict(_fields(f[9]))[1]))[1] == b"text"
          ev["texts"][tag] = tensor[8].decode()
  return ev


# --- Tests. ---


def test_crc32c_known_vectors():
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283
  assert metrics_lib.crc32c(b"") == 0
  assert _crc32c_bitwise(b"123456789") == 0xE3069283
  data = bytes(range(256)) * 3
  assert metrics_lib.crc32c(data) == _crc32c_bitwise(data)
  # Incremental use gives the same as one call.
  assert metrics_lib.crc32c(data[100:], metrics_lib.crc32c(data[:100])) == (
      metrics_lib.crc32c(data))


def test_jsonl_records_and_nonfinite(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path, "sft", tensorboard=False) as w:
    w.write(1, {"loss": jnp.asarray(2.5), "acc": np.float32(0.5),
                "tokens": np.int64(4096), "lr": 1e-4,
                "bf16": jnp.asarray(0.75, jnp.bfloat16)})
    rec = w.write(2, {"loss": jnp.asarray(jnp.nan), "grad_norm": float("inf"),
                      "ok": 1.0})
  assert rec["nonfinite"] == ["loss", "grad_norm"]
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  assert len(lines) == 2
  for line in lines:
    json.loads(line)  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in line and "Infinity" not in line
  r = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert r[0]["stage"] == "sft" and r[0]["step"] == 1
  assert r[0]["loss"] == 2.5 and r[0]["acc"] == 0.5 and r[0]["lr"] == 1e-4
  assert r[0]["tokens"] == 4096 and isinstance(r[0]["tokens"], int)
  assert r[0]["bf16"] == 0.75
  assert r[0]["elapsed"] >= 0 and "nonfinite" not in r[0]
  assert r[1]["loss"] is None and r[1]["grad_norm"] is None
  assert r[1]["ok"] == 1.0
  with pytest.raises(TypeError, match="not a scalar"):
    metrics_lib.to_host({"x": jnp.ones((2,))})


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics_lib.MetricsWriter(tmp_path, "rm", tensorboard=False) as w:
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 0.5})
  with open(path, "ab") as f:  # a process killed half way through a line
    f.write(b'{"stage": "rm", "step": 3, "lo')
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == [1, 2]
  # Resuming repairs the file before appending.
  with metrics_lib.MetricsWriter(tmp_path, "rm", tensorboard=False) as w:
    w.write(3, {"loss": 0.25})
  text = open(path).read()
  assert text.endswith("\n") and '"lo\n' not in text
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == [1, 2, 3]
  assert all(json.loads(l) for l in text.splitlines())
  # A file that is one torn line only.
  path.write_bytes(b'{"st')
  assert metrics_lib.read_metrics(path) == []
  metrics_lib.MetricsWriter(tmp_path, "rm", tensorboard=False).close()
  assert path.read_bytes() == b""


def test_tensorboard_event_file(tmp_path):
  config = {"lr": 1e-3, "model": {"d_model": 64}}
  with metrics_lib.MetricsWriter(tmp_path, "ppo") as w:
    w.write_config(config)
    w.write(10, {"loss": jnp.asarray(0.75), "lr": 3e-4, "note": "x"})
    w.write(20, {"loss": 0.5, "reward": np.float32(-1.25), "flag": True})
  files = glob.glob(str(tmp_path / "tb" / "ppo" / "events.out.tfevents.*"))
  assert len(files) == 1
  assert json.load(open(tmp_path / "tb" / "ppo" / "config.json")) == config
  events = [_decode_event(r) for r in _records(files[0])]
  assert events[0]["file_version"] == "brain.Event:2"
  assert '"d_model": 64' in events[1]["texts"]["config"]
  scalars = [(e["step"], e["values"]) for e in events[2:]]
  assert scalars == [(10, {"loss": 0.75, "lr": pytest.approx(3e-4)}),
                     (20, {"loss": 0.5, "reward": -1.25})]
  assert all(e["wall_time"] > 1e9 for e in events)
  # Negative int64 steps use 10-byte varints.
  ev = _decode_event(metrics_lib.encode_event(1.0, -3))
  assert ev["step"] == -3

  # TensorBoard (installed with some tensorflow builds) reads it too.
  # pylint: disable=g-import-not-at-top
  try:
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
  except ImportError:
    event_file_loader = None
  if event_file_loader is not None:
    loader_cls = getattr(event_file_loader, "LegacyEventFileLoader",
                         event_file_loader.EventFileLoader)
    got, texts = {}, {}
    for event in loader_cls(files[0]).Load():
      for v in event.summary.value:
        if v.HasField("simple_value"):
          got[(event.step, v.tag)] = v.simple_value
        elif v.HasField("tensor"):
          arr = tensor_util.make_ndarray(v.tensor)
          if v.metadata.plugin_data.plugin_name == "text":
            texts[v.tag] = arr.item().decode()
          else:
            got[(event.step, v.tag)] = float(arr)
    assert got == {(10, "loss"): 0.75, (10, "lr"): pytest.approx(3e-4),
                   (20, "loss"): 0.5, (20, "reward"): -1.25}
    assert '"lr": 0.001' in texts["config"]


def test_check_finite():
  metrics_lib.check_finite({"loss": 1.0, "grad_norm": float("nan")}, 3)
  with pytest.raises(FloatingPointError) as e:
    metrics_lib.check_finite({"loss": jnp.asarray(jnp.nan), "acc": 0.5}, 7)
  assert str(e.value) == (
      "non-finite loss at step 7: loss=nan; halting (no checkpoint written)")
  with pytest.raises(FloatingPointError, match="policy_loss=inf"):
    metrics_lib.check_finite({"policy_loss": np.float32(np.inf)}, 8)


class _Clock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


@pytest.mark.parametrize("tty", [False, True])
def test_progress_lines(tty):
  stream = io.StringIO()
  stream.isatty = lambda: tty
  clock = _Clock()
  p = metrics_lib.Progress(100, "sft", every_s=5.0, stream=stream, clock=clock)
  clock.t = 1.0
  assert p.update(5, tokens=500) is None  # too soon
  clock.t = 10.0
  line = p.update(20, tokens=1500)
  assert line.startswith("sft 20/100 (20.0%)")
  assert "2.00 steps/s" in line and "200.0 tok/s" in line
  assert "elapsed 0:00:10" in line and "eta 0:00:40" in line
  clock.t = 20.0
  assert p.update(40) is not None
  clock.t = 21.0
  p.update(41)
  p.close()
  out = stream.getvalue()
  if tty:
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1
  else:
    assert out.count("\n") == 3 and "\r" not in out
  assert "sft 41/100" in out  # close() reports the last step
  # The final step is always reported.
  stream2 = io.StringIO()
  p2 = metrics_lib.Progress(3, every_s=1e9, stream=stream2, clock=clock)
  assert p2.update(3) is not None and stream2.getvalue().startswith("3/3")


def test_inactive_writer_writes_nothing(tmp_path):
  w = metrics_lib.MetricsWriter(tmp_path / "w", "sft", active=False)
  assert w.write(1, {"loss": 1.0})["loss"] == 1.0
  w.write_config({"a": 1})
  w.close()
  assert not os.path.exists(tmp_path / "w")
