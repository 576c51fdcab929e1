"""Tests for instructrl.checkpoint: exact round trip, resharding, keep-N,
NaN refusal, and atomicity under a crash (tmp dir left over / SIGKILL)."""
import functools
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from instructrl import checkpoint as ckpt_lib
from instructrl import state_format
from instructrl import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Tiny(nnx.Module):
  """Params shaped like the project's: nnx.Param with logical_axes."""

  def __init__(self, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(1.0)
    self.w = nnx.Param(init(rngs.params(), (16, 8)),
                       logical_axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros((8,), jnp.bfloat16), logical_axes=("mlp",))
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])


@functools.cache
def make_state():
  return jax.jit(_make_state)()  # one compile instead of many eager ops


def _make_state():
  model = Tiny(nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = optax.adamw(1e-3).init(params)
  # One update so adam's mu/nu/count are not trivially zero.
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
  _, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
  return {
      "params": params,
      "opt_state": opt_state,
      "rest": rest,  # the model's non-Param state (empty here)
      "step": jnp.asarray(7, jnp.int32),
      "f32": jnp.asarray([1.5, -0.0, 3e-38, 1e38], jnp.float32),
      "bf16": jnp.asarray([1.0, -2.5, 1e-3], jnp.bfloat16),
      "i32": jnp.arange(5, dtype=jnp.int32) - 2,
      "key": jax.random.key(11),
      "dropout_rngs": nnx.state(nnx.Dropout(0.1, rngs=nnx.Rngs(3))),
  }


def _bits(x):
  if state_format.is_key(x):
    x = jax.random.key_data(x)
  x = np.asarray(jax.device_get(x))
  return x.dtype, x.shape, x.tobytes()


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert _bits(x) == _bits(y)


def test_roundtrip_is_bitwise_exact(tmp_path):
  state = dict(make_state(), host_i32=np.arange(3, dtype=np.int32))
  key = jax.random.key(42)
  meta = {"config": '{"lr": 0.001}', "stage": "sft", "best_metric": 0.25,
          "rng": state_format.encode_rng(key)}
  data_state = {"epoch": 1, "position": 12345, "shard": "train-00001"}
  with ckpt_lib.Checkpointer(tmp_path, save_every=7) as ckpt:
    assert ckpt.save(7, state, data_state=data_state, meta=meta)
    ckpt.wait()
  # A fresh Checkpointer, as after a restart.
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    restored, ds, m = ckpt.restore(abstract_state=state_format.abstract_like(state))
  assert_bitwise_equal(restored, state)
  assert ds == data_state
  assert m == meta
  # Variable metadata and types come back from the target.
  assert restored["params"]["w"].logical_axes == ("embed", "mlp")
  assert isinstance(restored["params"]["w"], nnx.Param)
  assert restored["bf16"].dtype == jnp.bfloat16
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert _bits(state_format.decode_rng(m["rng"])) == _bits(key)
  # Legacy uint32 keys round trip too.
  legacy = jax.random.PRNGKey(5)
  legacy_back = state_format.decode_rng(state_format.encode_rng(legacy))
  assert _bits(legacy_back) == _bits(legacy)
  # No pickle in the checkpoint: arrays in OCDBT, the rest JSON.
  for f in pathlib.Path(tmp_path).rglob("*"):
    assert f.suffix not in (".pkl", ".pickle"), f


def test_restore_onto_other_mesh_reshards(tmp_path):
  devices = jax.devices()
  assert len(devices) == 8
  model = Tiny(nnx.Rngs(1))
  _, params = nnx.split(model, nnx.Param)
  one = mesh_lib.make_mesh({"fsdp": 1}, devices[:1])
  params = jax.device_put(params, mesh_lib.param_shardings(params, one))
  state = {"params": params, "step": jnp.asarray(3)}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(3, state, data_state={})
    ckpt.wait()

  eight = mesh_lib.make_mesh({"fsdp": 8})
  shardings = {"params": mesh_lib.param_shardings(params, eight),
               "step": mesh_lib.replicated(eight)}
  target = state_format.abstract_like(state, shardings)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    restored, _, _ = ckpt.restore(abstract_state=target)
  w = restored["params"]["w"][...]
  assert w.sharding == NamedSharding(eight, P("fsdp", None))
  # Each device holds only its 2 rows of 16: never a full copy on one device.
  assert {s.data.shape for s in w.addressable_shards} == {(2, 8)}
  assert len({s.device for s in w.addressable_shards}) == 8
  assert_bitwise_equal(restored, state)


def test_keep_last_n_and_save_every(tmp_path):
  state = {"x": jnp.zeros((4,))}
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=2) as ckpt:
    saved = [s for s in range(1, 10)
             if ckpt.save(s, {"x": state["x"] + s}, data_state={"s": s})]
    assert saved == [2, 4, 6, 8]
    assert ckpt.save(9, {"x": state["x"] + 9}, data_state={"s": 9}, force=True)
    # A step is never written twice (e.g. final forced save after periodic).
    assert not ckpt.save(9, state, data_state={"s": 9}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [8, 9]
    restored, ds, _ = ckpt.restore(
        8, abstract_state=state_format.abstract_like(state))
  assert ds == {"s": 8}
  np.testing.assert_array_equal(restored["x"], np.full((4,), 8.0))
  assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()
                if p.name.isdigit()) == ["8", "9"]


def test_state_may_be_donated_right_after_save(tmp_path):
  state = {"w": jnp.full((512, 512), 1.0)}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    target = state_format.abstract_like(state)
    ckpt.save(1, state, data_state={})
    # The blocking part of an async save copies to host; the train step may
    # donate (and overwrite) the buffers at once.
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7, s),
                   donate_argnums=0)
    step(state)
    ckpt.wait()
    restored, _, _ = ckpt.restore(abstract_state=target)
  np.testing.assert_array_equal(np.asarray(restored["w"]), 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refuses_to_save_nonfinite(tmp_path, bad):
  state = make_state()
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.save(1, state, data_state={})
    broken = dict(state, bf16=state["bf16"].at[1].set(bad))
    with pytest.raises(FloatingPointError, match="step 2.*bf16"):
      ckpt.save(2, broken, data_state={})
    params = jax.tree.map(lambda x: x, state["params"])
    params["w"][...] = params["w"][...].at[0, 0].set(bad)
    with pytest.raises(FloatingPointError, match="params/w"):
      ckpt.save(2, dict(state, params=params), data_state={}, force=True)
    # Leaves on different device sets (a mesh and one device) and on host.
    mesh = mesh_lib.make_mesh({"fsdp": 8})
    mixed = {"sharded": jax.device_put(jnp.ones((8, 2)), NamedSharding(
                 mesh, P("fsdp"))),
             "dev1": jax.device_put(jnp.ones((2,)), jax.devices()[1]),
             "host": np.asarray([1.0, bad], np.float32)}
    with pytest.raises(FloatingPointError, match="host"):
      ckpt.save(3, mixed, data_state={})
    mixed["host"] = np.ones((2,), np.float32)
    mixed["dev1"] = mixed["dev1"].at[0].set(bad)
    with pytest.raises(FloatingPointError, match="dev1"):
      ckpt.save(3, mixed, data_state={})
    ckpt.wait()
    assert ckpt.all_steps() == [1]
  assert not (pathlib.Path(tmp_path) / "2").exists()


def test_rejects_bad_json_and_bad_restore_targets(tmp_path):
  state = {"x": jnp.ones((2,))}
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    with pytest.raises(TypeError, match="data_state"):
      ckpt.save(1, state, data_state={"a": np.int64(1)})
    with pytest.raises(FileNotFoundError):
      ckpt.restore(abstract_state=state_format.abstract_like(state))
    ckpt.save(1, state, data_state={})
    ckpt.wait()
    with pytest.raises(ValueError, match="sharding"):
      ckpt.restore(
          abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    # A target that does not match the stored tree is an error, not a guess.
    for wrong in ({"x": jnp.ones((2,)), "y": jnp.ones((1,))},
                  {"x": jnp.ones((3,))}):
      with pytest.raises(ValueError):
        ckpt.restore(abstract_state=state_format.abstract_like(wrong))


def test_leftover_tmp_dir_is_never_latest(tmp_path):
  state = make_state()
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(2, state, data_state={"s": 2})
    ckpt.wait()
  # What a save killed half way leaves behind: a partial tmp dir of a later
  # step (no commit marker, array data missing).
  tmp = pathlib.Path(tmp_path) / "4.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(pathlib.Path(tmp_path) / "2", tmp)
  (tmp / "commit_success.txt").unlink(missing_ok=True)
  (tmp / "_CHECKPOINT_METADATA").unlink(missing_ok=True)
  shutil.rmtree(tmp / "state" / "d")
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    restored, ds, _ = ckpt.restore(abstract_state=state_format.abstract_like(state))
    assert ds == {"s": 2}
    assert_bitwise_equal(restored, state)
    ckpt.wait()
    assert not tmp.exists()  # cleaned up on open
    assert ckpt.save(4, state, data_state={"s": 4})  # the step is free again
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]


_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from instructrl import checkpoint as ckpt_lib
    from instructrl import state_format
    ckpt = ckpt_lib.Checkpointer(sys.argv[1], max_to_keep=2, save_every=1)
    state = {"w": jnp.zeros((4, 1024, 1024), jnp.float32), "b": jnp.zeros((8,))}
    start = ckpt.latest_step()
    if start is None:
      start = 0
    else:  # resume like a training job would
      state, data_state, _ = ckpt.restore(
          abstract_state=state_format.abstract_like(state))
      assert data_state["step"] == start
    for step in range(start + 1, start + 1000):
      state = jax.tree.map(lambda x: x + 1.0, state)
      print("saving", step, flush=True)
      ckpt.save(step, state, data_state={"step": step}, meta={"n": step})
""")


def _tmp_dirs(directory):
  return [p.name for p in pathlib.Path(directory).iterdir()
          if ".orbax-checkpoint-tmp" in p.name]


def test_sigkill_during_async_save_leaves_a_good_checkpoint(tmp_path):
  rng = random.Random(0)
  pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=pythonpath)
  target = state_format.abstract_like(
      {"w": jnp.zeros((4, 1024, 1024)), "b": jnp.zeros((8,))})
  killed_mid_write = 0
  for attempt in range(3):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
      # Let it commit a couple of steps, then kill it: on even attempts as
      # soon as a write is seen in progress, on odd ones after a random delay.
      for _ in range(3):
        line = proc.stdout.readline()
        assert line.startswith("saving"), line
      deadline = time.monotonic() + 5.0
      if attempt % 2 == 0:
        while not _tmp_dirs(tmp_path) and time.monotonic() < deadline:
          time.sleep(0.001)
      else:
        time.sleep(rng.uniform(0.0, 0.15))
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    killed_mid_write += bool(_tmp_dirs(tmp_path))
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
      step = ckpt.latest_step()
      assert step is not None
      assert set(map(str, ckpt.all_steps())) <= {
          p.name for p in pathlib.Path(tmp_path).iterdir()}
      state, data_state, meta = ckpt.restore(abstract_state=target)
      ckpt.wait()
      assert not _tmp_dirs(tmp_path)  # leftovers are removed on open
    # Every value was bumped once per step: a torn write would show here.
    assert data_state == {"step": step} and meta == {"n": step}
    np.testing.assert_array_equal(np.asarray(state["w"]), float(step))
    np.testing.assert_array_equal(np.asarray(state["b"]), float(step))
  # The interesting case (kill while orbax was writing) did happen.
  assert killed_mid_write >= 1


def test_save_every_is_the_policy_and_force_saves_skipped_steps(tmp_path):
  x = jnp.zeros((3,))
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=None, save_every=2) as ckpt:
    saved = [s for s in range(1, 7)
             if ckpt.save(s, {"x": x + s}, data_state={"s": s})]
    assert saved == [2, 4, 6]  # 1, 3, 5 skipped
    # A forced step the policy would skip (the final one, an eval step).
    assert ckpt.save(7, {"x": x + 7}, data_state={"s": 7}, force=True)
    # The forced final save of a step already saved is a no-op...
    assert not ckpt.save(7, {"x": x}, data_state={"s": -1}, force=True)
    assert not ckpt.save(6, {"x": x}, data_state={"s": -1}, force=True)
    # ... and so is one behind the latest (never saved: 5 was skipped).
    assert not ckpt.save(5, {"x": x}, data_state={"s": -1}, force=True)
    assert ckpt.save(8, {"x": x + 8}, data_state={"s": 8})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 6, 7, 8]
    _, ds, _ = ckpt.restore(7, abstract_state=state_format.abstract_like({"x": x}))
    assert ds == {"s": 7}  # not overwritten by the second forced save
    # Without best_metric, metrics are stored but nothing is "best".
    assert ckpt.save(10, {"x": x}, data_state={}, metrics={"val_loss": 1.0})
    assert ckpt.best_step() is None


def test_constructor_validates():
  with pytest.raises(ValueError, match="save_every"):
    ckpt_lib.Checkpointer("/nonexistent-unused", save_every=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt_lib.Checkpointer("/nonexistent-unused", best_metric="x",
                          best_mode="median")
  with pytest.raises(ValueError, match="max_to_keep"):
    ckpt_lib.Checkpointer("/nonexistent-unused", max_to_keep=0)


# val_loss per step 1..6: best (lowest) at step 2, so that max_to_keep=2
# keeps 5 and 6 by recency and 2 only because it is the best.
_VAL_LOSS = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.5, 6: 2.0}


def _best_run(directory, mode, steps, *, async_save=True, metrics_at=None):
  """Saves `steps` ({"x": step}); returns the Checkpointer (open)."""
  sign = 1.0 if mode == "min" else -1.0
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=2, save_every=1,
                               best_metric="val_loss", best_mode=mode,
                               async_save=async_save)
  for s in steps:
    metrics = None
    if s in (metrics_at if metrics_at is not None else _VAL_LOSS):
      metrics = {"val_loss": sign * _VAL_LOSS[s], "val_acc": 0.5}
    assert ckpt.save(s, {"x": jnp.full((4,), float(s)),
                         "n": jnp.arange(3) + s},
                     data_state={"s": s}, meta={"m": s}, metrics=metrics)
  return ckpt


@pytest.mark.parametrize("mode,async_save", [("min", True), ("max", True),
                                             ("min", False)])
def test_keeps_best_by_metric_besides_latest(tmp_path, mode, async_save):
  # With best_mode="max" the same run is saved with negated values, so the
  # best is again step 2.
  with _best_run(tmp_path, mode, range(1, 7), async_save=async_save) as ckpt:
    assert ckpt.best_step() == 2
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.latest_step() == 6
    target = state_format.abstract_like({"x": jnp.zeros((4,)),
                                     "n": jnp.zeros((3,), jnp.int32)})
    state, ds, meta = ckpt.restore(2, abstract_state=target)
  assert_bitwise_equal(state, {"x": jnp.full((4,), 2.0),
                               "n": jnp.arange(3) + 2})
  assert ds == {"s": 2} and meta == {"m": 2}
  assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()
                if p.name.isdigit()) == ["2", "5", "6"]


def test_periodic_saves_without_metrics_are_kept_by_recency_only(tmp_path):
  # Steps 7..10 carry no metrics (periodic saves between evaluations): the
  # latest 2 of them are kept, the older ones pruned, the best survives.
  with _best_run(tmp_path, "min", range(1, 11)) as ckpt:
    ckpt.wait()
    assert ckpt.all_steps() == [2, 9, 10]
    assert ckpt.best_step() == 2
  # No checkpoint carrying the metric: no best, recency only.
  with _best_run(tmp_path / "none", "min", range(1, 5), metrics_at=()) as ckpt:
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.best_step() is None


def test_metrics_must_carry_best_metric_and_be_finite(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1,
                             best_metric="val_loss") as ckpt:
    state = {"x": jnp.ones((2,))}
    with pytest.raises(ValueError, match="val_loss"):
      ckpt.save(1, state, data_state={}, metrics={"loss": 1.0})
    with pytest.raises(TypeError, match="metrics"):
      ckpt.save(1, state, data_state={}, metrics={"val_loss": float("nan")})
    with pytest.raises(TypeError, match="metrics"):
      ckpt.save(1, state, data_state={}, metrics={"val_loss": "low"})
    assert ckpt.all_steps() == []
    assert ckpt.save(1, state, data_state={},
                     metrics={"val_loss": np.float32(0.5)})
    ckpt.wait()
    assert ckpt.best_step() == 1


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_survives_resume(tmp_path, mode):
  _best_run(tmp_path, mode, range(1, 7)).close()
  sign = 1.0 if mode == "min" else -1.0
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=1,
                             best_metric="val_loss", best_mode=mode) as ckpt:
    assert ckpt.best_step() == 2  # read back from the stored metrics
    assert ckpt.all_steps() == [2, 5, 6]
    x = {"x": jnp.zeros((4,)), "n": jnp.zeros((3,), jnp.int32)}
    ckpt.save(7, x, data_state={"s": 7})
    ckpt.save(8, x, data_state={"s": 8}, metrics={"val_loss": sign * 1.5})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 7, 8]
    assert ckpt.best_step() == 2
    state, ds, _ = ckpt.restore(2, abstract_state=state_format.abstract_like(x))
    assert ds == {"s": 2}
    np.testing.assert_array_equal(state["x"], np.full((4,), 2.0))
    # A new best replaces the old one, which then goes like any other.
    ckpt.save(9, x, data_state={"s": 9}, metrics={"val_loss": sign * 0.5})
    ckpt.wait()
    assert ckpt.all_steps() == [8, 9]
    assert ckpt.best_step() == 9
  assert not (pathlib.Path(tmp_path) / "2").exists()


_KILLED_SAVE = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    import jax.numpy as jnp
    from instructrl import checkpoint as ckpt_lib
    d = pathlib.Path(sys.argv[1])
    ckpt = ckpt_lib.Checkpointer(d, save_every=1)
    ckpt.save(1, {"w": jnp.zeros((8,))}, data_state={"s": 1})
    ckpt.wait()
    # An async save of a big state; die as soon as it is under way.
    ckpt.save(2, {"w": jnp.ones((4, 1024, 1024))}, data_state={"s": 2})
    deadline = time.monotonic() + 30
    while not any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir()):
      if (d / "2").exists() or time.monotonic() > deadline:
        sys.exit(3)  # committed before it could be killed
      time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("finish", ["open", "wait", "close"])
def test_tmp_dir_of_a_killed_save_is_gone_after_next_open(tmp_path, finish):
  pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=pythonpath)
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
                        env=env, stderr=subprocess.PIPE, text=True,
                        timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert _tmp_dirs(tmp_path), "the killed save left no tmp dir"
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  if finish == "open":  # removed before the constructor returns
    assert not _tmp_dirs(tmp_path)
  assert ckpt.all_steps() == [1]
  _, ds, _ = ckpt.restore(
      abstract_state=state_format.abstract_like({"w": jnp.zeros((8,))}))
  assert ds == {"s": 1}
  # No save on this Checkpointer (orbax itself awaits its cleanup only
  # there): the leftover is gone all the same.
  getattr(ckpt, "close" if finish == "open" else finish)()
  assert not _tmp_dirs(tmp_path)
  if finish == "wait":
    assert ckpt.save(2, {"w": jnp.ones((8,))}, data_state={"s": 2})
    ckpt.close()
    assert sorted(p.name for p in pathlib.Path(tmp_path).iterdir()
                  if p.name.isdigit()) == ["1", "2"]
