"""The eval stage: every finished model on the held-out test prompts.

Models: the base model with a few-shot prompt (the paper's "GPT (prompted)"),
SFT, PPO and PPO-ptx. Each answers every test prompt greedily; the gold judge
compares each answer with SFT's, and PPO-ptx's with PPO's (a paired
bootstrap over prompts). On device we also measure the RM score of the
answers, the KL to SFT and the gold utility of one temperature-1 sample per
prompt, and the held-out pretraining-corpus loss (the alignment tax). Writes
`eval/report.json`, `eval/samples.jsonl` and PNG plots.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


from instructrl import mesh as mesh_lib
from instructrl import paths
from instructrl import steps
from instructrl.eval import answers as answers_lib
from instructrl.eval import judge
from instructrl.model import LanguageModel, ModelConfig, ScalarModel
from instructrl.model.sharded import abstract
from instructrl.rl import rollout as rollout_lib
from instructrl.sampling import SampleConfig, make_sampler
from instructrl.stages import inputs
from instructrl.stages import lm
from instructrl.stages import loop
from instructrl.stages.validate import check_stage

MODELS = (("base", "pretrain"), ("sft", "sft"), ("ppo", "ppo"), ("ppo_ptx", "ppo_ptx"))


def _fewshot_prefix(config, n: int) -> str:
  from instructrl.data import world  # pylint: disable=g-import-not-at-top
  w = world.get_world(world.WorldConfig.from_dict(dict(config.data.world)))
  # One example per family when possible, so every task is shown; the
  # answer is the clean reference (a carefully written prompt, as the
  # paper's prompted GPT-3), not a demonstration with its writer's habits.
  seen, picked = set(), []
  for p in w.prompts("sft", "train"):
    if p.family not in seen and len(picked) < n:
      seen.add(p.family)
      picked.append(f"{p.text} {p.reference}\n\n")
  return "".join(picked)


@dataclasses.dataclass(frozen=True)
class Programs:
  """The compiled programs every model's answers go through, built once.

  greedy/sample: samplers `(params, prompt_tokens, prompt_mask, key)`;
  score: the RM at each row's last token `(rm, seq, seq_mask)`; ref_logp:
  SFT log-probs of a response `(sft, seq, seq_mask, response)`; lm_eval:
  held-out corpus loss `(params, batch)`.
  """
  cfg: ModelConfig
  rm_cfg: ModelConfig
  shardings: object  # The policy's parameters.
  greedy: mesh_lib.Jitted
  sample: mesh_lib.Jitted
  score: mesh_lib.Jitted
  ref_logp: mesh_lib.Jitted
  lm_eval: mesh_lib.Program  # With abstract args: a batch of held-out corpus.


def build(config, mesh, stage: str = "eval") -> Programs:
  del stage
  cfg, rm_cfg = inputs.model_config(config), inputs.rm_model_config(config)
  g_lm, abs_lm = abstract(LanguageModel, cfg)
  g_rm, _ = abstract(ScalarModel, rm_cfg)
  sh_lm = mesh_lib.param_shardings(abs_lm, mesh)
  n, ids = config.eval.max_new_tokens, inputs.special_ids(config)
  held = {k: lm.abstract_rows(mesh, (config.eval.batch_size, config.pretrain.seq_len),
                              dt) for k, dt in lm.LM_BATCH.items()}
  return Programs(
      cfg, rm_cfg, sh_lm,
      greedy=make_sampler(g_lm, sh_lm, SampleConfig(n, 0.0, **ids), mesh),
      sample=make_sampler(g_lm, sh_lm, SampleConfig(n, 1.0, **ids), mesh),
      score=mesh_lib.jit(
          lambda p, s, m: rollout_lib.sequence_scores(g_rm, p, s, m), mesh),
      ref_logp=mesh_lib.jit(
          lambda p, s, m, r: rollout_lib.response_logprobs(g_lm, p, s, m, r), mesh),
      lm_eval=lm.lm_eval_program(g_lm, steps.with_shardings(abs_lm, sh_lm), held, mesh))


def _answers(config, progs, params, texts, seq_len, mesh, rm, sft, vocab):
  """Greedy answers (decoded), their RM scores, the sampled KL to SFT, and
  the temperature-1 samples (decoded): batch i samples with key i + 1, the
  same for every model."""
  answers, scores, kls, sampled = [], [], [], []
  it = answers_lib.prompt_batches(texts, vocab=vocab, seq_len=seq_len,
                                  batch_size=config.eval.batch_size, tag="test")
  for i, batch in enumerate(it):
    b = mesh_lib.put_batch(batch, mesh)
    prompt = (b["prompt_tokens"], b["prompt_mask"])
    out = progs.greedy(params, *prompt, jax.random.key(0))
    seq_mask = jnp.concatenate([b["prompt_mask"], out.response_mask], axis=1)
    s = progs.score(rm, out.tokens, seq_mask)
    smp = progs.sample(params, *prompt, jax.random.key(i + 1))
    sm = jnp.concatenate([b["prompt_mask"], smp.response_mask], axis=1)
    ref_lp = progs.ref_logp(sft, smp.tokens, sm, smp.response)
    kl = jnp.sum(jnp.where(smp.response_mask, smp.logp_raw - ref_lp, 0.0), axis=1)
    real = np.asarray(batch["prompt_mask"]).any(axis=1)
    answers.extend(answers_lib.decode(vocab, batch, out))
    sampled.extend(answers_lib.decode(vocab, batch, smp))
    scores.extend(np.asarray(s)[real].tolist())
    kls.extend(np.asarray(kl)[real].tolist())
  n = len(texts)
  return answers[:n], float(np.mean(scores)), float(np.mean(kls)), sampled[:n]


def run(config, workdir: str, mesh, stage: str = "eval") -> dict:
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  check_stage(config, "eval", mesh)
  t0 = time.monotonic()
  ec = config.eval
  progs = build(config, mesh, stage)
  vocab = inputs.vocabulary(config)
  prompts = pipeline.get_prompts("world", "test", world=dict(config.data.world))
  if ec.num_prompts:
    prompts = prompts[:ec.num_prompts]
  _, rm, _ = inputs.load_model(workdir, "rm", ScalarModel, progs.rm_cfg, mesh)
  _, sft, _ = inputs.load_model(workdir, "sft", LanguageModel, progs.cfg, mesh)
  heldout = inputs.iterator(config, "lm", config.pretrain.data, "validation",
                            ec.batch_size, config.pretrain.seq_len, config.seed,
                            infinite=False)
  prefix = _fewshot_prefix(config, ec.fewshot)
  by_model, extra, samples, sampled = {}, {}, [], {}
  for name, source in MODELS:
    if not loop.is_done(workdir, source):
      continue
    params = (sft if source == "sft" else
              inputs.load_model(workdir, source, LanguageModel, progs.cfg, mesh)[1])
    texts = [(prefix if name == "base" else "") + p.text for p in prompts]
    seq_len = ec.fewshot_prompt_len if name == "base" else config.ppo.prompt_len
    answers, score, kl, sampled[name] = _answers(config, progs, params, texts,
                                                 seq_len, mesh, rm, sft, vocab)
    by_model[name] = answers
    held = loop.batch_eval(progs.lm_eval.fn, params, heldout, mesh, ec.heldout_batches)
    extra[name] = {"rm_score": score, "kl_to_sft": kl, "heldout_lm_loss": held["loss"]}
  from instructrl.data import world  # pylint: disable=g-import-not-at-top
  sign_off = world.SIGN_OFF if config.data.world.get("sign_off", 0.0) > 0 else ""
  report = judge.summarise(prompts, by_model, "sft", extra, sign_off=sign_off,
                           sampled=sampled, resamples=ec.bootstrap_resamples,
                           seed=config.seed)
  out = paths.join(workdir, "eval")
  for name, answers in by_model.items():
    for p, a, t1 in zip(prompts, answers, sampled[name]):
      samples.append({"prompt": p.text, "family": p.family, "model": name,
                      "response": a, "reference": p.reference,
                      "gold_utility": p.utility(a), "response_t1": t1,
                      "gold_utility_t1": p.utility(t1)})
  paths.write_atomic(paths.join(out, "samples.jsonl"),
                     "".join(json.dumps(s) + "\n" for s in samples))
  paths.write_atomic(paths.join(out, "report.json"), json.dumps(report, indent=1))
  from instructrl.eval import plot  # pylint: disable=g-import-not-at-top
  if paths.is_local(workdir):  # plot writes PNGs with matplotlib, locally.
    plot.eval_plots(workdir, report)
  print(judge.table(report))
  return {"stage": "eval", "report": report, "wall_s": time.monotonic() - t0}
