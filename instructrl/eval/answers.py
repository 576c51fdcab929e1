"""Prompt texts in, decoded responses out: the host side of every sampler use
outside the PPO loop (eval, on-policy RM data, the probe)."""
from __future__ import annotations

import jax
import numpy as np

from instructrl import mesh as mesh_lib


def prompt_batches(texts, *, vocab, seq_len: int, batch_size: int, tag: str = "prompt"):
  """One pass over `texts` as left-padded prompt rows, in order (last batch padded)."""
  from instructrl.data import common as dcommon  # pylint: disable=g-import-not-at-top
  from instructrl.data import pipeline  # pylint: disable=g-import-not-at-top
  records = [dcommon.PromptRecord(t, f"{tag}:{i}") for i, t in enumerate(texts)]
  return pipeline.iterator_from_records(
      "prompts", records, seq_len=seq_len, vocab=vocab,
      batching=pipeline.Batching(batch_size=batch_size, infinite=False))


def decode(vocab, batch, out) -> list[str]:
  """The responses of `batch`'s real rows (padding rows dropped), EOS removed."""
  resp, mask = np.asarray(out.response), np.asarray(out.response_mask)
  real = np.asarray(batch["prompt_mask"]).any(axis=1)
  eos = set(vocab.eos_ids)
  return [vocab.decode([int(t) for t, m in zip(resp[r], mask[r]) if m and t not in eos])
          for r in np.flatnonzero(real)]


def generate(sampler, params, texts, mesh, *, vocab, seq_len: int, batch_size: int,
             seed: int = 0, tag: str = "prompt") -> list[str]:
  """`sampler`'s decoded answer to every text; batch b samples with key seed + b."""
  answers = []
  for b, batch in enumerate(prompt_batches(texts, vocab=vocab, seq_len=seq_len,
                                           batch_size=batch_size, tag=tag)):
    x = mesh_lib.put_batch(batch, mesh)
    out = sampler(params, x["prompt_tokens"], x["prompt_mask"], jax.random.key(seed + b))
    answers.extend(decode(vocab, batch, out))
  return answers[:len(texts)]
