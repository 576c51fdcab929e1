"""SFT options from the paper: a pretraining mix, and selection by RM score.

- `mixed_batches`: each SFT batch gets pretraining rows appended (the paper's
  PPO-initialisation SFT model used 10% pretraining data). The rows share the
  SFT batch's layout, so the step's LM loss runs over the union; each
  pretraining row is weighted to count as much as an average SFT row, so
  that 10% of the rows is 10% of the loss (a demonstration's answer is a few
  tokens, a pretraining row is full: token weighting gave the 10% of rows
  most of the loss and cost SFT a third of its gold utility).
- `rm_score_eval`: the mean reward-model score of greedy answers to the
  validation prompts; with it the kept SFT checkpoint is the one with the
  best RM score on validation, as the paper chose its final SFT models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from instructrl import mesh as mesh_lib
from instructrl.rl import rollout as rollout_lib
from instructrl.sampling import SampleConfig, make_sampler
from instructrl.stages import loop


def ptx_rows(batch_size: int, frac: float, multiple: int) -> int:
  """Pretraining rows so that they are `frac` of the mixed batch, rounded to
  a multiple of the data-parallel size (every device gets whole rows)."""
  if frac <= 0:
    return 0
  rows = frac / (1.0 - frac) * batch_size
  return max(multiple, int(round(rows / multiple)) * multiple)


def _concat_rows(a, b):
  """SFT rows then pretraining rows, the latter weighted as an average SFT row.

  The weight comes from this process's rows, so with several processes the
  loss is a close approximation of the single-process one, not bit-equal.
  """
  if "loss_mask" in a:
    sft_w, ptx_w = a["loss_mask"].sum(), b["loss_mask"].sum()
    scale = (sft_w / len(a["loss_mask"])) / (ptx_w / len(b["loss_mask"])) if ptx_w else 1.0
    a = dict(a, loss_mask=a["loss_mask"].astype(np.float32))
    b = dict(b, loss_mask=(b["loss_mask"] * scale).astype(np.float32))
  return {k: np.concatenate([a[k], b[k]], axis=0) for k in a}


def mixed_batches(sft, ptx) -> loop.JointBatches:
  """SFT rows followed by pretraining rows; one joint resumable state."""
  return loop.JointBatches(sft, ptx, _concat_rows, names=("sft", "ptx"))


def rm_score_eval(lm_graphdef, lm_shardings, rm_graphdef, rm_params, prompts_it,
                  mesh, special_ids: dict, max_new_tokens: int):
  """`eval(params) -> {"rm_score"}` over a one-pass prompt iterator;
  `special_ids` the vocabulary's {"eos_ids", "pad_id"}."""
  sampler = make_sampler(lm_graphdef, lm_shardings,
                         SampleConfig(max_new_tokens, 0.0, **special_ids), mesh)
  score = mesh_lib.jit(
      lambda p, s, m: rollout_lib.sequence_scores(rm_graphdef, p, s, m), mesh)

  def run(params):
    prompts_it.step = 0
    total, n = 0.0, 0
    for batch in prompts_it:
      b = mesh_lib.put_batch(batch, mesh)
      out = sampler(params, b["prompt_tokens"], b["prompt_mask"], jax.random.key(0))
      seq_mask = jnp.concatenate([b["prompt_mask"], out.response_mask], axis=1)
      s = np.asarray(score(rm_params, out.tokens, seq_mask))
      real = np.asarray(batch["prompt_mask"]).any(axis=1)
      total += float(s[real].sum())
      n += int(real.sum())
    return {"rm_score": total / max(n, 1)}
  return run
