"""Our side of each benchmark, through the library's own code paths.

Each builder returns a `Case` whose step is exactly what a training stage
runs per step: `steps.jit_step(train_step)` for SFT and RM, `make_sampler`
for sampling, and for PPO-ptx the stage's own wiring
(`instructrl.stages.ppo.jit_rollout` + `jit_learn`, the state-donating
`rl.learner.learn`). The PPO phases are also compiled one by one (sample / score /
reference+value+GAE / learn) to show where an iteration's time goes; those
split programs exist only here, the stage runs the fused rollout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Case, Shape
from instructrl import mesh as mesh_lib
from instructrl.rl import learner as ppo_lib
from instructrl.rl import rollout as rollout_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import init_sharded
from instructrl.sampling import SampleConfig, make_sampler
from instructrl.stages import ppo as ppo_stage

LM_KEYS = {"tokens": 2, "targets": 2, "loss_mask": 2, "segment_ids": 2, "positions": 2}
RM_KEYS = {"tokens": 3, "positions": 3, "segment_ids": 3, "ranks": 2, "valid": 2}


def model_config(s: Shape, **kw) -> ModelConfig:
  return ModelConfig(vocab_size=s.vocab, num_layers=s.num_layers, d_model=s.d_model,
                     num_heads=s.num_heads, max_len=s.max_len, style="gpt",
                     dtype=s.dtype, **kw)


def one_device_mesh():
  return mesh_lib.make_mesh({"fsdp": 1}, jax.devices()[:1])


def lm_batch(s: Shape, rows: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tok = rng.integers(2, s.vocab, (rows, seq + 1), dtype=np.int32)
  return {"tokens": tok[:, :-1], "targets": tok[:, 1:],
          "loss_mask": np.ones((rows, seq), np.float32),
          "segment_ids": np.ones((rows, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def rm_batch(s: Shape, seed: int = 1) -> dict:
  """`rm_pairs` prompts with K=2 ranked completions each, `seq_len` tokens."""
  rng = np.random.default_rng(seed)
  p, t = s.rm_pairs, s.seq_len
  return {"tokens": rng.integers(2, s.vocab, (p, 2, t), dtype=np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (p, 2, t)).copy(),
          "segment_ids": np.ones((p, 2, t), np.int32),
          "ranks": np.tile(np.array([[0, 1]], np.int32), (p, 1)),
          "valid": np.ones((p, 2), bool)}


def prompt_batch(s: Shape, seed: int = 2) -> dict:
  rng = np.random.default_rng(seed)
  return {"prompt_tokens": rng.integers(2, s.vocab, (s.prompts, s.prompt_len),
                                        dtype=np.int32),
          "prompt_mask": np.ones((s.prompts, s.prompt_len), bool),
          "prompt_id": np.arange(s.prompts, dtype=np.int32)}


def _train_case(name, s: Shape, model_cls, loss_fn, keys, batch, mesh, **cfg_kw):
  cfg = model_config(s, **cfg_kw)
  tx = steps.make_optimizer(1e-4, 10_000, 10)
  box = {}

  def setup():
    graphdef, state, s_sh = steps.create_train_state(model_cls, cfg, tx, mesh)
    fn = functools.partial(steps.train_step, loss_fn=loss_fn(graphdef), tx=tx)
    box.update(state=state, step=steps.jit_step(fn, s_sh, mesh, keys),
               batch=mesh_lib.put_batch(batch, mesh), rng=jax.random.key(0))

  def step():
    box["state"], m = box["step"](box["state"], box["batch"], box["rng"])
    jax.block_until_ready((box["state"], m))
  return Case(name, "ours", setup, step)


def sft_case(s: Shape, mesh, name="sft", **cfg_kw) -> Case:
  return _train_case(name, s, LanguageModel, steps.lm_loss_fn, LM_KEYS,
                     lm_batch(s, s.sft_batch, s.seq_len), mesh, **cfg_kw)


def rm_case(s: Shape, mesh, **cfg_kw) -> Case:
  return _train_case("rm", s, ScalarModel, steps.rm_loss_fn, RM_KEYS, rm_batch(s),
                     mesh, **cfg_kw)


def sample_config(s: Shape) -> SampleConfig:
  # EOS = vocab size is never drawn, so every row makes all `new_tokens`
  # tokens on both sides (HF's GPT-2 EOS, 50256, is outside vocab too).
  return SampleConfig(max_new_tokens=s.new_tokens, temperature=1.0, eos_ids=(s.vocab,),
                      pad_id=0)


def sample_case(s: Shape, mesh, **cfg_kw) -> Case:
  cfg = model_config(s, **cfg_kw)
  box = {}

  def setup():
    graphdef, params, sh = init_sharded(LanguageModel, cfg, mesh)
    b = mesh_lib.put_batch(prompt_batch(s), mesh)
    box.update(params=params, fn=make_sampler(graphdef, sh, sample_config(s), mesh),
               b=b, key=jax.random.key(0), i=0)

  def step():
    box["i"] += 1
    out = box["fn"](box["params"], box["b"]["prompt_tokens"], box["b"]["prompt_mask"],
                    jax.random.fold_in(box["key"], box["i"]))
    jax.block_until_ready(out)
  return Case("sample", "ours", setup, step)


class PPOBench:
  """The PPO-ptx stage's programs on random SFT/RM weights, plus split phases."""

  def __init__(self, s: Shape, mesh, **cfg_kw):
    self.s, self.mesh = s, mesh
    self.cfg = model_config(s, **cfg_kw)

  def setup(self):
    s, mesh, cfg = self.s, self.mesh, self.cfg
    g_lm, sft, sh_lm = init_sharded(LanguageModel, cfg, mesh, seed=0)
    g_sc, rm, sh_sc = init_sharded(ScalarModel, cfg, mesh, seed=1)
    self.graphdefs = {"policy": g_lm, "ref": g_lm, "rm": g_sc, "value": g_sc}
    self.frozen = {"ref": sft, "rm": rm}
    self.rc = rollout_lib.RolloutConfig(max_new_tokens=s.new_tokens, eos_ids=(s.vocab,),
                                        pad_id=0, lam=0.95, gamma=1.0)
    self.pc = ppo_lib.PPOConfig(epochs=1, minibatch_size=s.ppo_minibatch,
                                ptx_coef=27.8 if s.ptx_rows else 0.0)
    self.txs = {n: steps.make_optimizer(1e-5, 10_000, 10, schedule="constant")
                for n in ("policy", "value")}
    state_sh = ppo_stage.state_shardings(sh_lm, sh_sc, sft, rm, self.txs, mesh)
    init = functools.partial(ppo_lib.init_state, policy_tx=self.txs["policy"],
                             value_tx=self.txs["value"], kl_coef=0.02)
    self.state = mesh_lib.jit(init, mesh, out_shardings=state_sh)(sft, rm)
    frozen_sh = {"ref": sh_lm, "rm": sh_sc}
    self.rollout = ppo_stage.jit_rollout(self.graphdefs, self.rc, frozen_sh, state_sh,
                                         mesh)
    self.learn = ppo_stage.jit_learn(self.graphdefs, self.txs, self.pc, state_sh, mesh)
    b = prompt_batch(s)
    self.prompts = mesh_lib.put_batch(b, mesh)
    self.ptx = None
    if s.ptx_rows:
      self.ptx = mesh_lib.put_batch(lm_batch(s, s.ptx_rows, s.ptx_len, seed=3), mesh)
    self.rng = jax.random.key(0)
    self._split_programs(sh_lm, sh_sc)

  def iteration(self):
    """What stages.ppo.run's step_fn does per iteration."""
    key = ppo_lib.iteration_keys(self.rng, self.state["step"])[0]
    exp, rm = self.rollout(self.frozen, self.state, self.prompts, key)
    self.state, lm = self.learn(self.state, exp, self.ptx, self.rng, rm["kl"])
    jax.block_until_ready((self.state, lm, rm))

  def _split_programs(self, sh_lm, sh_sc):
    g, rc = self.graphdefs, self.rc
    sc = SampleConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                      eos_ids=rc.eos_ids, pad_id=rc.pad_id)
    self.sampler = make_sampler(g["policy"], sh_lm, sc, self.mesh)

    def score(rm, seq, prompt_mask, mask):
      seq_mask = jnp.concatenate([prompt_mask.astype(bool), mask], axis=1)
      return rollout_lib.sequence_scores(g["rm"], rm, seq, seq_mask), seq_mask

    def ref_value(ref, value, out, seq_mask, score, kl_coef):
      return rollout_lib.experience_from_sample(
          g, {"ref": ref, "value": value}, out, seq_mask, score, kl_coef, rc)[0]
    self.score_fn = jax.jit(score)
    self.ref_value_fn = jax.jit(ref_value)

  def phases(self) -> dict:
    """Callables for the split phases; each blocks on its own output."""
    box = {}

    def sample():
      out = self.sampler(self.state["params"], self.prompts["prompt_tokens"],
                         self.prompts["prompt_mask"], self.rng)
      box["out"] = jax.block_until_ready(out)

    def score():
      out = box["out"]
      box["score"], box["seq_mask"] = jax.block_until_ready(self.score_fn(
          self.frozen["rm"], out.tokens, self.prompts["prompt_mask"], out.response_mask))

    def ref_value():
      out = box["out"]
      box["exp"] = jax.block_until_ready(self.ref_value_fn(
          self.frozen["ref"], self.state["value_params"], out, box["seq_mask"],
          box["score"], self.state["kl_coef"]))

    def learn():
      self.state, m = self.learn(self.state, box["exp"], self.ptx, self.rng,
                                 jnp.float32(0.0))
      jax.block_until_ready((self.state, m))
    return {"ppo_sample": sample, "ppo_score": score, "ppo_ref_value": ref_value,
            "ppo_learn": learn}


def ppo_cases(s: Shape, mesh, **cfg_kw) -> list[Case]:
  """[iteration, sample, score, ref_value, learn]; one shared setup."""
  bench = PPOBench(s, mesh, **cfg_kw)
  done = []

  def setup():
    if not done:
      bench.setup()
      done.append(True)
  cases = [Case("ppo_iter", "ours", setup, bench.iteration)]
  phases = {}

  def phase(name):
    def run():
      if not phases:
        phases.update(bench.phases())
      phases[name]()
    return run
  for n in ("ppo_sample", "ppo_score", "ppo_ref_value", "ppo_learn"):
    cases.append(Case(n, "ours", setup, phase(n)))
  return cases


def matmul_case(n: int = 2048, dtype=jnp.float32) -> Case:
  box = {}

  def setup():
    k1, k2 = jax.random.split(jax.random.key(0))
    box["a"] = jax.random.normal(k1, (n, n), dtype)
    box["b"] = jax.random.normal(k2, (n, n), dtype)
    box["f"] = jax.jit(jnp.dot)

  def step():
    box["f"](box["a"], box["b"]).block_until_ready()
  return Case("matmul", "ours", setup, step)
