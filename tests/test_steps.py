"""Train-step tests: accumulation, sharding equivalence, no recompilation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import mesh as mesh_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, max_len=16,
                  style="llama", num_kv_heads=2, d_ff=64, scan_layers=True)


def _lm_batch(b=8, t=16, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(2, 64, size=(b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  for i in range(b):  # Ragged rows: different token counts per microbatch.
    seg[i, t - i:] = 0
  mask = (seg > 0).astype(np.float32)
  mask[:, :3] = 0.0  # A "prompt" that is not trained on.
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": seg, "positions": pos}


def _rm_batch(p=8, k=4, t=12, seed=0):
  rng = np.random.RandomState(seed)
  seg = np.ones((p, k, t), np.int32)
  seg[:, :, t - 3:] = rng.randint(0, 2, size=(p, k, 3)) * 0
  valid = np.ones((p, k), bool)
  valid[0, 3] = False
  return {"tokens": rng.randint(2, 64, size=(p, k, t)).astype(np.int32),
          "segment_ids": seg,
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (p, k, t)).copy(),
          "ranks": np.tile(np.arange(k, dtype=np.int32), (p, 1)), "valid": valid}


def _setup(mesh, model_cls, loss_maker, micro=1, seed=0):
  tx = steps.make_optimizer(1e-2, total_steps=10, warmup_steps=2)
  g, state, sh = steps.create_train_state(model_cls, CFG, tx, mesh, seed)
  fn = functools.partial(steps.train_step, loss_fn=loss_maker(g), tx=tx,
                         num_micro=micro, use_dropout=False)
  return g, state, sh, fn


@pytest.mark.parametrize("kind", ["lm", "rm"])
def test_microbatch_accumulation_equals_full_batch(kind):
  mesh = mesh_lib.make_mesh({}, jax.devices()[:1])
  cls, maker, batch = ((LanguageModel, steps.lm_loss_fn, _lm_batch()) if kind == "lm"
                       else (ScalarModel, steps.rm_loss_fn, _rm_batch()))
  g, state, _, _ = _setup(mesh, cls, maker)
  loss_fn = maker(g)
  batch = jax.tree.map(jnp.asarray, batch)
  full, fm = jax.jit(lambda p: steps.accumulate_grads(loss_fn, p, batch, None, 1))(
      state["params"])
  acc, am = jax.jit(lambda p: steps.accumulate_grads(loss_fn, p, batch, None, 4))(
      state["params"])
  np.testing.assert_allclose(am["loss"], fm["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lm", "rm"])
def test_sharded_steps_equal_single_device_and_do_not_recompile(kind):
  cls, maker, batch = ((LanguageModel, steps.lm_loss_fn, _lm_batch()) if kind == "lm"
                       else (ScalarModel, steps.rm_loss_fn, _rm_batch()))
  ndims = {k: np.ndim(v) for k, v in batch.items()}
  curves = []
  for shape, devices in (({}, jax.devices()[:1]), ({"data": 2, "fsdp": 2, "tensor": 2}, None)):
    mesh = mesh_lib.make_mesh(shape, devices)
    _, state, sh, fn = _setup(mesh, cls, maker, micro=2)
    run = steps.jit_step(fn, sh, mesh, ndims)
    losses = []
    for i in range(4):
      # The same batch each step, so the loss must fall.
      state, m = run(state, mesh_lib.put_batch(batch, mesh), jax.random.key(0))
      losses.append(float(m["loss"]))
    assert run.jitted._cache_size() == 1
    assert int(state["step"]) == 4
    curves.append((losses, jax.device_get(state["params"])))
  np.testing.assert_allclose(curves[1][0], curves[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(curves[1][1]), jax.tree.leaves(curves[0][1])):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  assert curves[0][0][-1] < curves[0][0][0]


def test_optimizer_schedules():
  tx = steps.make_optimizer(1.0, total_steps=100, warmup_steps=0)
  sched_vals = []
  params = {"w": jnp.zeros(())}
  st = tx.init(params)
  for _ in range(101):  # current_lr reads the rate the last update used.
    _, st = tx.update({"w": jnp.ones(())}, st, params)
    sched_vals.append(float(steps.current_lr(st)))
  assert sched_vals[0] == pytest.approx(1.0)
  assert sched_vals[50] == pytest.approx(0.55, abs=1e-3)  # 0.1 + 0.9 * 0.5
  assert sched_vals[100] == pytest.approx(0.1)  # Cosine to 10% of the peak.
  tx = steps.make_optimizer(1.0, total_steps=100, warmup_steps=10, schedule="constant")
  st = tx.init(params)
  vals = []
  for _ in range(12):
    _, st = tx.update({"w": jnp.ones(())}, st, params)
    vals.append(float(steps.current_lr(st)))
  assert vals[0] == pytest.approx(0.1) and vals[10] == pytest.approx(1.0)
  assert vals[5] == pytest.approx(0.55)
