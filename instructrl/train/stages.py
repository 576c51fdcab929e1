"""Stages 0-2: pretraining the tiny base model, SFT, and the reward model.

Each `run_*` takes the locked config and the workdir, builds its data,
state and jitted step, calls the shared loop, and exports its result.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from instructrl import losses
from instructrl import mesh as mesh_lib
from instructrl import steps
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.train import common
from instructrl.train import sft_extras

LM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
RM_KEYS = ("tokens", "segment_ids", "positions", "ranks", "valid")


def model_config(config, dropout: float = 0.0, **overrides) -> ModelConfig:
  """The model config; `model.vocab_size = 0` means "the vocabulary's size"."""
  d = dict(config.model)
  if not d["vocab_size"]:
    from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
    d["vocab_size"] = int(pipeline.resolve_vocab(
        config.data.vocab, config.data.cache_dir or None).vocab_size)
  d.update(dropout_rate=dropout, **overrides)
  return ModelConfig.from_dict(d)


def rm_model_config(config, dropout: float = 0.0) -> ModelConfig:
  """The reward and value models' config: `config.rm_model` if the config
  has one (one 6B RM for every policy size), else the policy's."""
  if "rm_model" not in config:
    return model_config(config, dropout)
  vocab = model_config(config).vocab_size
  d = dict(config.rm_model, dropout_rate=dropout)
  if d["vocab_size"] and d["vocab_size"] != vocab:
    # The RM reads the policy's token ids.
    raise common.ConfigError(f"config.rm_model.vocab_size={d['vocab_size']} differs "
                             f"from the policy's vocabulary size {vocab}")
  d["vocab_size"] = vocab
  return ModelConfig.from_dict(d)


def rm_key(config) -> str:
  """The config key of the RM's shape, for error messages."""
  return "rm_model" if "rm_model" in config else "model"


def _param_shapes(d: dict) -> list:
  _, abs_params = abstract(LanguageModel, ModelConfig.from_dict(d))
  return [(jax.tree_util.keystr(p), x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(abs_params)]


def check_init_shape(config, stage: str, init: str) -> None:
  """A stage-name `init` must have the shape of the model `stage` trains.

  Only `config.rm_model` makes them differ: the pretrain and SFT exports have
  `config.model`'s shape, the RM export `config.rm_model`'s. Needs no data
  layer: `rm_model_config` checks the vocabulary sizes.
  """
  if "rm_model" not in config or init not in ("pretrain", "sft", "rm"):
    return
  want = "rm_model" if stage == "rm" else "model"
  have = "rm_model" if init == "rm" else "model"
  if want == have:
    return
  lm, rm = dict(config.model), dict(config.rm_model)
  lm["vocab_size"] = lm["vocab_size"] or rm["vocab_size"] or 1
  rm["vocab_size"] = rm["vocab_size"] or lm["vocab_size"]
  if _param_shapes(lm) != _param_shapes(rm):
    raise common.ConfigError(
        f"config.{stage}.init={init!r}: that export has config.{have}'s shape, "
        f"but {stage} trains config.{want}'s; set config.{stage}.init to a "
        f"params path of that shape, or 'none'")


def check_seq_len(stage: str, seq_len: int, cfg: ModelConfig,
                  key: str = "model") -> None:
  if seq_len > cfg.max_len:
    raise common.ConfigError(f"config.{stage}.seq_len={seq_len} exceeds "
                             f"config.{key}.max_len={cfg.max_len}")


def data_args(config) -> dict:
  d = config.data
  return dict(vocab=d.vocab, world=dict(d.world), on_error=d.on_error,
              cache_dir=d.cache_dir or None,
              process_index=jax.process_index(), process_count=jax.process_count())


def _iterator(config, kind, spec, split, batch_size, seq_len, seed, **kw):
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_iterator(kind, spec, batch_size=batch_size, seq_len=seq_len,
                                split=split, seed=seed, **data_args(config), **kw)


def _init_params(config, workdir, stage: str, model_cls, cfg: ModelConfig, mesh):
  """Params from a finished stage ("pretrain", "sft"), a path, or "none"."""
  init = config[stage].init
  if init in ("", "none"):
    return None
  check_init_shape(config, stage, init)
  graphdef, abs_params = abstract(model_cls, cfg)
  shardings = mesh_lib.state_shardings(abs_params, mesh)
  if init in ("pretrain", "sft", "rm"):
    src_cls = ScalarModel if init == "rm" else LanguageModel
    _, src_abs = abstract(src_cls, cfg)
    src = common.load_export(workdir, init, src_abs,
                             mesh_lib.state_shardings(src_abs, mesh))
  else:
    src_cls = model_cls
    src = common.load_params(init, abs_params, shardings)
  if src_cls is model_cls:
    return src
  # LM -> scalar model: take the backbone, keep the fresh (zero) scalar head.
  return transplant_backbone(src, model_cls, cfg, mesh)


def transplant_backbone(src_params, model_cls, cfg, mesh, seed: int = 0):
  """New `model_cls` params whose backbone is copied from `src_params`."""
  _, abs_params = abstract(model_cls, cfg)
  shardings = mesh_lib.state_shardings(abs_params, mesh)

  def build(src, key):
    fresh = nnx.split(model_cls(cfg, nnx.Rngs(key)))[1]
    fresh["backbone"] = src["backbone"]
    return fresh
  return common.mesh_jit(build, mesh, out_shardings=shardings)(
      src_params, jax.random.key(seed))


def _batch_eval(eval_step, params, it, mesh, max_batches=None) -> dict:
  """Means of `eval_step` metrics over a one-pass iterator (weights: 'weight')."""
  totals, weight = {}, 0.0
  it.step = 0  # One-pass iterators are reused for every evaluation.
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    m = jax.device_get(eval_step(params, mesh_lib.put_batch(batch, mesh)))
    w = float(m.pop("weight"))
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + float(v) * w
    weight += w
  return {k: v / max(weight, 1e-9) for k, v in totals.items()}


def _lm_eval_step(graphdef, mesh):
  loss_fn = steps.lm_loss_fn(graphdef)

  def fn(params, batch):
    _, m = loss_fn(params, batch, None)
    return {"loss": m["loss"], "accuracy": m["accuracy"], "weight": m["num_tokens"]}
  return common.mesh_jit(fn, mesh)


def run_lm_stage(config, workdir: str, stage: str, mesh) -> dict:
  """Pretraining ("pretrain", packed corpus) or SFT ("sft", demonstrations)."""
  sc = config[stage]
  t0 = time.monotonic()
  cfg = model_config(config, dropout=sc.dropout)
  kind = "lm" if stage == "pretrain" else "sft"
  check_seq_len(stage, sc.seq_len, cfg)
  mesh_lib.check_batch_divides(sc.batch_size, mesh, f"{stage}.batch_size")
  train_it = _iterator(config, kind, sc.data, "train", sc.batch_size, sc.seq_len,
                       config.seed)
  if stage == "pretrain":
    num_steps = sc.steps
  else:
    num_steps = int(np.ceil(sc.epochs * train_it.batches_per_epoch))
  rows = sc.batch_size
  if stage == "sft" and sc.ptx_frac > 0:
    extra = sft_extras.ptx_rows(sc.batch_size, sc.ptx_frac,
                                mesh_lib.batch_size_multiple(mesh))
    train_it = sft_extras.mixed_batches(train_it, _iterator(
        config, "lm", sc.ptx_data, "train", extra, sc.seq_len, config.seed + 1))
    rows += extra
  tx = steps.make_optimizer(sc.lr, num_steps, sc.warmup_steps,
                            weight_decay=sc.weight_decay)
  init = _init_params(config, workdir, stage, LanguageModel, cfg, mesh)
  graphdef, state, shardings = steps.create_train_state(
      LanguageModel, cfg, tx, mesh, config.seed, params=init)
  step_fn = functools.partial(steps.train_step, loss_fn=steps.lm_loss_fn(graphdef),
                              tx=tx, num_micro=sc.microbatches,
                              use_dropout=sc.dropout > 0)
  run = steps.jit_step(step_fn, shardings, mesh, {k: 2 for k in LM_KEYS})
  eval_step = _lm_eval_step(graphdef, mesh)
  val_it = _iterator(config, kind, sc.data, "validation", sc.batch_size,
                     sc.seq_len, config.seed, infinite=False)

  select = _rm_selection(config, workdir, stage, graphdef, shardings, mesh)

  def eval_fn(params):
    m = _batch_eval(eval_step, params, val_it, mesh, sc.eval_batches)
    if select is not None:
      m.update(select(params))
    return m
  state, best, summary = common.train_loop(
      stage=stage, workdir=workdir, state=state, shardings=shardings, step_fn=run,
      batches=train_it, mesh=mesh, num_steps=num_steps, seed=config.seed,
      log_every=sc.log_every, save_every=sc.save_every, eval_every=sc.eval_every,
      eval_fn=eval_fn, tokens_per_step=rows * sc.seq_len,
      eval_key="loss" if select is None else "rm_score",
      eval_mode="min" if select is None else "max",
      meta={"config": config.to_json()})
  info = {"stage": stage, "steps": summary["steps"], "best": summary["best"],
          "final": summary["last"], "wall_s": time.monotonic() - t0}
  common.export(workdir, stage, best, info)
  return info


def _rm_selection(config, workdir, stage, graphdef, shardings, mesh):
  """With `sft.select_rm` set (a finished "rm" stage or a params path), the
  kept SFT checkpoint is the best by RM score on validation prompts."""
  if stage != "sft" or not config.sft.select_rm:
    return None
  from instructrl.data import EOS_ID  # pylint: disable=g-import-not-at-top
  g_rm, abs_rm = abstract(ScalarModel, rm_model_config(config))
  sh_rm = mesh_lib.state_shardings(abs_rm, mesh)
  src = config.sft.select_rm
  rm = (common.load_export(workdir, "rm", abs_rm, sh_rm) if src == "rm"
        else common.load_params(src, abs_rm, sh_rm))
  sc = config.sft
  prompts = _iterator(config, "prompts", sc.data, "validation", sc.batch_size,
                      sc.select_prompt_len, config.seed, infinite=False)
  return sft_extras.rm_score_eval(graphdef, shardings["params"], g_rm, rm, prompts,
                                  mesh, EOS_ID, sc.select_new_tokens)


def _rm_eval_step(graphdef, mesh):
  def fn(params, batch):
    scores = steps.rm_scores(graphdef, params, batch)
    _, m = losses.ranking_loss(scores, batch["ranks"], batch["valid"])
    return {"loss": m["loss"], "accuracy": m["accuracy"], "weight": m["num_pairs"]}
  return common.mesh_jit(fn, mesh)


def demo_score_mean(config, graphdef, params, mesh, seq_len) -> float:
  """Mean RM score of the training demonstrations (prompt + reference)."""
  sc = config.rm
  it = _iterator(config, "sft", sc.demo_data, "train", sc.batch_size * 4, seq_len,
                 config.seed, infinite=False)

  def fn(p, batch):
    # SFT rows hold inputs x[:-1] and targets x[1:]; the RM reads the whole
    # sequence x, EOS included, as in its own comparison rows.
    # The whole x has at most seq_len tokens, so x = tokens[0] + targets[:-1]
    # keeps every real token within the model's positions.
    seg = batch["segment_ids"]
    full = jnp.concatenate([batch["tokens"][:, :1], batch["targets"][:, :-1]], axis=1)
    full_seg = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
    pos = jnp.broadcast_to(jnp.arange(full.shape[1], dtype=jnp.int32), full.shape)
    r = nnx.merge(graphdef, p).reward(full, pos, full_seg)
    real = jnp.any(seg > 0, axis=1)
    return {"score": jnp.sum(jnp.where(real, r, 0.0)) / jnp.maximum(jnp.sum(real), 1),
            "weight": jnp.sum(real)}
  return _batch_eval(common.mesh_jit(fn, mesh), params, it, mesh,
                     sc.demo_batches)["score"]


def run_rm_stage(config, workdir: str, mesh) -> dict:
  """The reward model: Eq. 1 over all pairs of each prompt, then the bias.

  Trains on every labeler group but `heldout_group`; reports validation
  accuracy on the training groups and, separately, on the held-out group
  (the paper's Appendix E.2). Afterwards the bias is set so that the
  training demonstrations score mean 0 (Section 3.5).
  """
  from instructrl.data import labelers  # pylint: disable=g-import-not-at-top
  sc = config.rm
  t0 = time.monotonic()
  cfg = rm_model_config(config, dropout=sc.dropout)
  mesh_lib.check_batch_divides(sc.batch_size, mesh, "rm.batch_size")
  check_seq_len("rm", sc.seq_len, cfg, rm_key(config))
  held = sc.heldout_group
  train_groups = [g for g in range(labelers.NUM_GROUPS) if g != held]
  spec, sampled = sc.data, {}
  if sc.get("candidates", "world") == "sft":
    from instructrl.train import rm_data  # pylint: disable=g-import-not-at-top
    sampled = {s: rm_data.build(config, workdir, mesh, s) for s in ("train", "validation")}
    print(f"[rm] labelled SFT samples: {sampled}")
    spec = rm_data.data_spec(workdir)
  it = _iterator(config, "rm", spec, "train", sc.batch_size, sc.seq_len,
                 config.seed, groups=train_groups if held >= 0 else None)
  num_steps = int(np.ceil(sc.epochs * it.batches_per_epoch))
  tx = steps.make_optimizer(sc.lr, num_steps, sc.warmup_steps,
                            weight_decay=sc.weight_decay)
  init = _init_params(config, workdir, "rm", ScalarModel, cfg, mesh)
  graphdef, state, shardings = steps.create_train_state(
      ScalarModel, cfg, tx, mesh, config.seed, params=init)
  step_fn = functools.partial(steps.train_step, loss_fn=steps.rm_loss_fn(graphdef),
                              tx=tx, num_micro=sc.microbatches,
                              use_dropout=sc.dropout > 0)
  ndims = {"tokens": 3, "segment_ids": 3, "positions": 3, "ranks": 2, "valid": 2,
           "group": 1}
  run = steps.jit_step(step_fn, shardings, mesh, ndims)
  eval_step = _rm_eval_step(graphdef, mesh)

  val = {name: _iterator(config, "rm", spec, "validation", sc.batch_size,
                         sc.seq_len, config.seed, infinite=False, groups=groups)
         for name, groups in (("", train_groups), ("heldout_group_", [held]))
         if groups != [-1]}

  def eval_fn(params):
    m = {}
    for prefix, vit in val.items():
      m.update({prefix + k: v for k, v in _batch_eval(eval_step, params, vit,
                                                       mesh).items()})
    return m
  state, best, summary = common.train_loop(
      stage="rm", workdir=workdir, state=state, shardings=shardings, step_fn=run,
      batches=it, mesh=mesh, num_steps=num_steps, seed=config.seed,
      log_every=sc.log_every, save_every=sc.save_every, eval_every=sc.eval_every,
      eval_fn=eval_fn, eval_key="accuracy", eval_mode="max",
      meta={"config": config.to_json()})
  mean = demo_score_mean(config, graphdef, best, mesh, sc.seq_len)
  best = jax.tree.map(lambda x: x, best)
  best["bias"].set_value(best["bias"].get_value() - mean)
  info = {"stage": "rm", "steps": summary["steps"], "best": summary["best"],
          "final": summary["last"], "demo_mean_before_bias": mean,
          "heldout_group": held, "sampled_data": sampled,
          "wall_s": time.monotonic() - t0}
  common.export(workdir, "rm", best, info)
  return info
