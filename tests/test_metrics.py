"""Tests for instructrl.metrics: JSON lines, TensorBoard files (read back
with a small TFRecord reader and tensorboardX's protos), progress line and the
NaN guard."""
import glob
import io
import json
import os
import struct
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX import event_file_writer as tbx_event_file_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from instructrl import metrics as metrics_lib


# --- Reading event files back: TFRecord framing checked with a bitwise
# CRC32C, each record parsed as an Event proto. ---


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
  """TFRecords: 8-byte length, 4-byte crc, data, 4-byte crc."""
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


def _events(path):
  return [event_pb2.Event.FromString(r) for r in _records(path)]


def _event_file(logdir):
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert len(files) == 1, files
  return files[0]


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events
          for v in e.summary.value if v.HasField("simple_value")]


def _texts(events):
  return {v.tag: v.tensor.string_val[0].decode() for e in events
          for v in e.summary.value
          if v.metadata.plugin_data.plugin_name == "text"}


def _hparams(events):
  """{tag: HParamsPluginData} of the hparams plugin's summaries."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.metadata.plugin_data.plugin_name == "hparams":
        assert v.tag not in out
        out[v.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(
            v.metadata.plugin_data.content)
  return out


def _value(v):
  """A google.protobuf.Value as a Python scalar."""
  return getattr(v, v.WhichOneof("kind"))


# --- Tests. ---


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
  config = {"lr": 1e-3, "use_bias": True, "name": "gpt",
            "model": {"d_model": 64, "dropout": 0.0, "act": {"kind": "gelu"}},
            "mesh_shape": [1, 4], "seed": None, "beta": np.float32(0.5)}
  with metrics_lib.MetricsWriter(tmp_path, "ppo") as w:
    w.write_config(config)
    w.write(10, {"loss": jnp.asarray(0.75), "lr": 3e-4, "note": "x"})
    w.write(20, {"loss": 0.5, "reward": np.float32(-1.25), "flag": True,
                 "tokens": np.int64(4096)})
  logdir = tmp_path / "tb" / "ppo"
  # One run directory: the event file and config.json, no hparams sub-run.
  assert sorted(os.listdir(logdir)) == [
      "config.json", os.path.basename(_event_file(logdir))]
  assert json.load(open(logdir / "config.json")) == json.loads(
      json.dumps(config, default=str))
  events = _events(_event_file(logdir))
  assert events[0].file_version == "brain.Event:2"
  assert all(e.wall_time > 1e9 for e in events)

  assert _scalars(events) == [
      (10, "loss", 0.75), (10, "lr", pytest.approx(3e-4)),
      (20, "loss", 0.5), (20, "reward", -1.25), (20, "tokens", 4096.0)]
  # Each scalar carries the wall time of its write() (the JSON record's).
  recs = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  by_step = {e.step: e.wall_time for e in events if e.summary.value
             and e.summary.value[0].HasField("simple_value")}
  assert [round(by_step[r["step"]], 3) for r in recs] == [r["time"]
                                                           for r in recs]

  texts = _texts(events)
  assert list(texts) == ["config/text_summary"]
  assert texts["config/text_summary"].splitlines()[:3] == [
      "    {", '      "beta": "0.5",', '      "lr": 0.001,']
  assert '        "d_model": 64,' in texts["config/text_summary"]

  hp = _hparams(events)
  # Only the session start: an experiment summary would override the
  # hparams of the other stages' runs in TensorBoard's HParams tab.
  assert list(hp) == ["_hparams_/session_start_info"]
  got = {k: _value(v)
         for k, v in hp["_hparams_/session_start_info"]
         .session_start_info.hparams.items()}
  assert got == {"lr": 1e-3, "use_bias": True, "name": "gpt",
                 "model.d_model": 64.0, "model.dropout": 0.0,
                 "model.act.kind": "gelu", "beta": 0.5}


def test_tensorboard_config_json_string(tmp_path):
  """write_config(str), as the stages call it with config.to_json()."""
  text = json.dumps({"opt": {"lr": 2e-5, "warmup": 10}, "stage": "sft"})
  with metrics_lib.MetricsWriter(tmp_path, "sft") as w:
    w.write_config(text, step=3)
  logdir = tmp_path / "tb" / "sft"
  assert (logdir / "config.json").read_text() == text + "\n"
  events = _events(_event_file(logdir))
  assert _texts(events) == {"config/text_summary": "    " + text}
  (start,) = [e for e in events for v in e.summary.value
              if v.tag == "_hparams_/session_start_info"]
  assert start.step == 3
  got = {k: _value(v) for k, v in _hparams([start])[
      "_hparams_/session_start_info"].session_start_info.hparams.items()}
  assert got == {"opt.lr": 2e-5, "opt.warmup": 10.0, "stage": "sft"}
  # A string that is not JSON is still saved and shown, with no hparams.
  with metrics_lib.MetricsWriter(tmp_path, "rm") as w:
    w.write_config("lr: 1e-3")
  events = _events(_event_file(tmp_path / "tb" / "rm"))
  assert _texts(events) == {"config/text_summary": "    lr: 1e-3"}
  assert not _hparams(events)


def test_tensorboard_flushes_while_open(tmp_path):
  logdir = tmp_path / "tb" / "sft"
  w = metrics_lib.MetricsWriter(tmp_path, "sft")
  try:
    w.write(1, {"loss": 2.0})
    # On disk within a few seconds without close() (flush_secs), so a killed
    # run keeps nearly all its scalars.
    deadline = time.monotonic() + 10.0
    while True:
      got = _scalars(_events(_event_file(logdir)))
      if got or time.monotonic() > deadline:
        break
      time.sleep(0.1)
    assert got == [(1, "loss", 2.0)]
  finally:
    w.close()
  w.close()  # a second close is a no-op


def test_tensorboard_writers_in_one_second_keep_their_files(tmp_path,
                                                            monkeypatch):
  # tensorboardX names event files by the second (and host) and opens them
  # "wb": pin its clock so both writers below fall in the same second.
  monkeypatch.setattr(tbx_event_file_writer, "time",
                      types.SimpleNamespace(time=lambda: 1700000000.25))
  with metrics_lib.MetricsWriter(tmp_path, "sft") as w:
    w.write(1, {"loss": 2.0})
  with metrics_lib.MetricsWriter(tmp_path, "sft") as w2:  # a quick restart
    w2.write(2, {"loss": 1.0})
  files = sorted(glob.glob(str(tmp_path / "tb" / "sft" / "events.out.*")))
  assert len(files) == 2
  assert all(".1700000000." in f for f in files)
  assert [_scalars(_events(f)) for f in files] == [
      [(1, "loss", 2.0)], [(2, "loss", 1.0)]]


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


def test_tensorboard_off_writes_no_events(tmp_path):
  with metrics_lib.MetricsWriter(tmp_path, "sft", tensorboard=False) as w:
    w.write_config({"a": 1})
    w.write(1, {"loss": 1.0})
  assert os.listdir(tmp_path / "tb" / "sft") == ["config.json"]
