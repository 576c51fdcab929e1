"""Model tests: numbers, causality, layouts (scan/remat) and sharding equivalence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from instructrl import mesh as mesh_lib
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import init_sharded

GPT = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, max_len=32)
LLAMA = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4,
                    num_kv_heads=2, max_len=32, style="llama", tie_embeddings=False,
                    d_ff=64)
CFGS = {"gpt": GPT, "llama": LLAMA}


def _tokens(b=2, t=12, v=97, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(2, v, size=(b, t)), jnp.int32)


def _split(cls, cfg, seed=0):
  return nnx.split(cls(cfg, nnx.Rngs(seed)))


def _loss(graphdef, params, tokens, segment_ids=None):
  logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits


@pytest.mark.parametrize("style", ["gpt", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_config(style, tied):
  cfg = dataclasses.replace(CFGS[style], tie_embeddings=tied)
  for cls, extra in ((LanguageModel, 0), (ScalarModel, cfg.d_model + 1)):
    _, state = _split(cls, cfg)
    n = sum(x.size for x in jax.tree.leaves(state))
    if cls is ScalarModel and not tied:
      extra -= cfg.d_model * cfg.vocab_size  # No LM head on the scalar model.
    assert n == cfg.num_params() + extra


def test_every_param_has_logical_axes():
  for cfg in (GPT, dataclasses.replace(LLAMA, scan_layers=True)):
    _, state = _split(LanguageModel, cfg)
    for path, v in jax.tree.leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = v.logical_axes
      assert len(axes) == v.get_value().ndim, path
      for name in axes:
        assert name in dict(mesh_lib.RULES), (path, name)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_scan_equals_unrolled_and_remat_equals_plain(style):
  tokens = _tokens()
  base = CFGS[style]
  ref_g, ref_p = _split(LanguageModel, base)
  (ref_l, ref_logits), ref_grad = jax.value_and_grad(_loss, 1, has_aux=True)(
      ref_g, ref_p, tokens)
  ref_flat = [np.asarray(x) for x in jax.tree.leaves(ref_grad)]
  for scan, remat in ((True, "none"), (False, "nothing_saveable"),
                      (True, "dots_saveable")):
    cfg = dataclasses.replace(base, scan_layers=scan, remat_policy=remat)
    g, p = _split(LanguageModel, cfg)
    (l, logits), grad = jax.jit(jax.value_and_grad(_loss, 1, has_aux=True),
                                static_argnums=0)(g, p, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l, ref_l, atol=1e-6)
    flat = [np.asarray(x) for x in jax.tree.leaves(grad)]
    if scan:  # Stacked layout: compare layer by layer.
      total = sum(np.sum(np.abs(x)) for x in flat)
      ref_total = sum(np.sum(np.abs(x)) for x in ref_flat)
      np.testing.assert_allclose(total, ref_total, rtol=1e-4)
    else:
      for a, b in zip(flat, ref_flat):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_causal_through_gradients(style):
  """d logits[t] / d embedding(token at s) is zero exactly when s > t."""
  cfg = dataclasses.replace(CFGS[style], tie_embeddings=False)
  g, p = _split(LanguageModel, cfg)
  t = 10
  tokens = jnp.arange(5, 5 + t, dtype=jnp.int32)[None]  # Distinct tokens.
  for q in (0, 4, 9):
    def f(params, q=q):
      logits, _ = nnx.merge(g, params)(tokens)
      return jnp.sum(logits[0, q] * jnp.arange(cfg.vocab_size))
    grad = jax.grad(f)(p)
    row_norm = np.abs(np.asarray(grad["backbone"]["embed"].get_value())).sum(-1)
    per_pos = row_norm[5:5 + t]
    assert np.all(per_pos[q + 1:] == 0.0), (q, per_pos)
    assert np.all(per_pos[:q + 1] > 0.0), (q, per_pos)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_packed_segments_equal_separate_sequences(style):
  g, p = _split(LanguageModel, CFGS[style])
  model = nnx.merge(g, p)
  a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3])
  pos = jnp.asarray([list(range(5)) + list(range(7)) + [0] * 3])
  logits, _ = model(packed, pos, seg)
  la, _ = model(a)
  lb, _ = model(b)
  np.testing.assert_allclose(logits[:, :5], la, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:12], lb, atol=1e-5)


def test_bf16_compute_with_fp32_params():
  cfg = dataclasses.replace(LLAMA, dtype="bfloat16")
  g, p = _split(LanguageModel, cfg)
  g32, p32 = _split(LanguageModel, LLAMA)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  tokens = _tokens()
  (l, logits), grad = jax.jit(jax.value_and_grad(_loss, 1, has_aux=True),
                              static_argnums=0)(g, p, tokens)
  _, ref = _loss(g32, p32, tokens)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grad))
  np.testing.assert_allclose(logits, ref, atol=0.05)
  assert np.isfinite(float(l))


def test_scalar_head_reads_last_real_token():
  g, p = _split(ScalarModel, GPT)
  model = nnx.merge(g, p)
  model.head.set_value(jax.random.normal(jax.random.key(1), (GPT.d_model,)))
  tokens = _tokens(3, 8)
  seg = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
  values = model(tokens, segment_ids=seg)
  rewards = model.reward(tokens, segment_ids=seg)
  assert values.shape == (3, 8) and rewards.shape == (3,)
  np.testing.assert_allclose(rewards, [values[0, 7], values[1, 4], values[2, 1]])
  # A padded tail does not change the reward of the real prefix.
  alone = model.reward(tokens[1:2, :5])
  np.testing.assert_allclose(rewards[1], alone[0], atol=1e-5)
  model.bias.set_value(jnp.float32(2.5))
  np.testing.assert_allclose(model.reward(tokens[1:2, :5]), alone + 2.5, atol=1e-5)


MESHES = [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}, {"data": 4, "tensor": 2}]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s.values())))
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_sharded_forward_and_grad_equal_single_device(style, shape):
  cfg = dataclasses.replace(CFGS[style], scan_layers=style == "llama")
  tokens = _tokens(8, 12)
  seg = jnp.ones_like(tokens).at[1, 9:].set(0)
  fn = jax.jit(jax.value_and_grad(_loss, 1, has_aux=True), static_argnums=0)
  one = mesh_lib.make_mesh({}, jax.devices()[:1])
  g, p1, _ = init_sharded(LanguageModel, cfg, one, seed=3)
  (l1, lg1), gr1 = fn(g, p1, tokens, seg)
  mesh = mesh_lib.make_mesh(shape)
  g, p8, sh = init_sharded(LanguageModel, cfg, mesh, seed=3)
  assert len(jax.tree.leaves(p8)[0].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_array_equal(a, b)  # Same init, whatever the layout.
  batch = mesh_lib.put_batch({"t": np.asarray(tokens), "s": np.asarray(seg)}, mesh)
  with jax.set_mesh(mesh):
    (l8, lg8), gr8 = fn(g, p8, batch["t"], batch["s"])
  np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lg8, lg1, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gr8), jax.tree.leaves(gr1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sharding_rules_map_parameters():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = dataclasses.replace(LLAMA, scan_layers=True, vocab_size=96)
  _, state, _ = init_sharded(LanguageModel, cfg, mesh)
  specs = {jax.tree_util.keystr(k): v.sharding.spec
           for k, v in jax.tree.leaves_with_path(state)}
  P = jax.sharding.PartitionSpec
  assert specs["['backbone']['embed'].value"] == P("tensor", "fsdp")
  assert specs["['backbone']['layers']['attn']['wq'].value"] == P(None, "fsdp", "tensor", None)
  assert specs["['backbone']['layers']['mlp']['wo'].value"] == P(None, "tensor", "fsdp")
  assert specs["['lm_head'].value"] == P("fsdp", "tensor")
  # 2 kv heads do not divide over tensor=4: replicated, not an error.
  assert mesh_lib.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8),
                                  {"data": 1, "fsdp": 2, "tensor": 4}) == P("fsdp", None, None)


def test_mesh_errors():
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_lib.make_mesh({"data": 3, "fsdp": 4})
  with pytest.raises(ValueError, match="unknown axis"):
    mesh_lib.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="does not divide over the data axes"):
    mesh_lib.check_batch_divides(6, mesh_lib.make_mesh({"fsdp": 4, "data": 2}))


def test_config_errors():
  with pytest.raises(ValueError, match="style"):
    ModelConfig(style="bert")
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    ModelConfig(remat_policy="bogus")
  with pytest.raises(ValueError, match="unknown model config key"):
    ModelConfig.from_dict({"layers": 3})
