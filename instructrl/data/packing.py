"""Token lists -> fixed-shape numpy example tables, one row per example.

Conventions shared with the trainers (docs/data.md has the full table):

* A sequence s = [s_0 .. s_n] (BOS first where the vocabulary adds one;
  s_n = EOS) is fed as tokens = s[:-1] and targets = s[1:], so
  targets[:, t] is the token after tokens[:, t]. Without BOS the first
  token is context only (the prompt is never empty, so this loses nothing).
* LM rows are packed: sequences are laid end to end and cut every T
  positions; `segment_ids` number the pieces of each row 1, 2, ... (0 is
  padding) and `positions` restart at 0 in each piece.
* Padding holds the vocabulary's `pad_id` (always masked out). Each table
  has one extra last row of padding (masks zero, invalid ids); the iterator
  points at it for rows past the end of the data.
* No special id is assumed: callers pass the vocabulary's `eos_id` and
  `pad_id`.
"""
from typing import Sequence

import numpy as np

from instructrl.data import common

RANK_PAD = np.iinfo(np.int32).max  # Rank of a missing completion: never wins.


def _with_padding_row(arrays: dict[str, np.ndarray], fill: dict[str, object]
                      ) -> dict[str, np.ndarray]:
  out = {}
  for key, a in arrays.items():
    pad = np.full((1,) + a.shape[1:], fill.get(key, 0), a.dtype)
    out[key] = np.concatenate([a, pad])
  return out


def pack_lm(docs: Sequence[Sequence[int]], seq_len: int, *, eos_id: int,
            pad_id: int) -> dict[str, np.ndarray]:
  """Packs documents (EOS is appended here) into rows of `seq_len`."""
  inputs, targets, doc_ids = [], [], []
  for i, ids in enumerate(docs):
    if not ids:
      continue
    seq = np.asarray(list(ids) + [eos_id], np.int32)
    inputs.append(seq[:-1])
    targets.append(seq[1:])
    doc_ids.append(np.full(len(seq) - 1, i, np.int64))
  if not inputs:
    raise common.DataError("lm", "no non-empty documents to pack")
  n = sum(len(x) for x in inputs)
  rows = -(-n // seq_len)
  size = rows * seq_len

  def lay(parts, fill, dtype):
    flat = np.full(size, fill, dtype)
    flat[:n] = np.concatenate(parts)
    return flat.reshape(rows, seq_len)

  tokens = lay(inputs, pad_id, np.int32)
  target = lay(targets, pad_id, np.int32)
  doc = lay(doc_ids, -1, np.int64)
  real = doc >= 0
  starts = np.ones_like(real)
  starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
  segment_ids = np.where(real, np.cumsum(starts, axis=1), 0).astype(np.int32)
  t = np.broadcast_to(np.arange(seq_len), doc.shape)
  start_pos = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
  positions = np.where(real, t - start_pos, 0).astype(np.int32)
  return _with_padding_row({
      "tokens": tokens,
      "targets": target,
      "loss_mask": real.astype(np.float32),
      "segment_ids": segment_ids,
      "positions": positions,
  }, {"tokens": pad_id, "targets": pad_id})


def sft_rows(prompts: Sequence[Sequence[int]],
             completions: Sequence[Sequence[int]], seq_len: int, *,
             eos_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """One demonstration per row: prompt + completion + EOS, right-padded.

  The loss mask is 1 exactly where the target is a completion token or the
  final EOS; prompt tokens are context only. Callers check lengths first
  (len(prompt) + len(completion) + 1 <= seq_len).
  """
  seqs, trained = [], []
  for p, c in zip(prompts, completions):
    seqs.append(list(p) + list(c) + [eos_id])
    trained.append([False] * len(p) + [True] * (len(c) + 1))
  return sequence_rows(seqs, trained, seq_len, pad_id=pad_id)


def sequence_rows(seqs: Sequence[Sequence[int]],
                  trained: Sequence[Sequence[bool]], seq_len: int, *,
                  pad_id: int) -> dict[str, np.ndarray]:
  """One sequence per row, right-padded; the loss is where `trained` is.

  `trained[i][j]` says whether token j of sequence i is learned (as the
  target of position j - 1), so the loss mask is `trained[i][1:]`: the
  assistant turns of a conversation, the completion + EOS of a
  demonstration, all of a plain text. Needs len(seq) <= seq_len.
  """
  n = len(seqs)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  targets = np.full((n, seq_len), pad_id, np.int32)
  loss_mask = np.zeros((n, seq_len), np.float32)
  segment_ids = np.zeros((n, seq_len), np.int32)
  positions = np.zeros((n, seq_len), np.int32)
  for i, (seq, flags) in enumerate(zip(seqs, trained)):
    length = len(seq) - 1
    tokens[i, :length] = seq[:-1]
    targets[i, :length] = seq[1:]
    loss_mask[i, :length] = flags[1:]
    segment_ids[i, :length] = 1
    positions[i, :length] = np.arange(length)
  return _with_padding_row({
      "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
      "segment_ids": segment_ids, "positions": positions},
      {"tokens": pad_id, "targets": pad_id})


def rm_rows(prompts: Sequence[Sequence[int]],
            completions: Sequence[Sequence[Sequence[int]]],
            ranks: Sequence[Sequence[int]], groups: Sequence[int],
            seq_len: int, k_max: int, *, eos_id: int,
            pad_id: int) -> dict[str, np.ndarray]:
  """One comparison per row: K sequences prompt + completion + EOS.

  K is padded to `k_max` with invalid slots (`valid` False, rank RANK_PAD,
  PAD tokens), so every batch has the same shape.
  """
  n = len(prompts)
  tokens = np.full((n, k_max, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((n, k_max, seq_len), np.int32)
  positions = np.zeros((n, k_max, seq_len), np.int32)
  rank = np.full((n, k_max), RANK_PAD, np.int32)
  valid = np.zeros((n, k_max), bool)
  for i, (p, cs, rs) in enumerate(zip(prompts, completions, ranks)):
    for k, c in enumerate(cs):
      seq = list(p) + list(c) + [eos_id]
      tokens[i, k, :len(seq)] = seq
      segment_ids[i, k, :len(seq)] = 1
      positions[i, k, :len(seq)] = np.arange(len(seq))
    rank[i, :len(rs)] = rs
    valid[i, :len(cs)] = True
  return _with_padding_row({
      "tokens": tokens, "segment_ids": segment_ids, "positions": positions,
      "ranks": rank, "valid": valid,
      "group": np.asarray(groups, np.int32).reshape(n)},
      {"tokens": pad_id, "ranks": RANK_PAD, "group": -1})


def prompt_rows(prompts: Sequence[Sequence[int]], ids: Sequence[int],
                max_len: int, *, pad_id: int) -> dict[str, np.ndarray]:
  """Prompts LEFT-padded to `max_len` (so generation starts in one column).

  `prompt_id` is the index into the split's prompt list; the padding row
  has -1.
  """
  n = len(prompts)
  tokens = np.full((n, max_len), pad_id, np.int32)
  mask = np.zeros((n, max_len), bool)
  for i, p in enumerate(prompts):
    if p:
      tokens[i, max_len - len(p):] = p
      mask[i, max_len - len(p):] = True
  return _with_padding_row({
      "prompt_tokens": tokens, "prompt_mask": mask,
      "prompt_id": np.asarray(ids, np.int32).reshape(n)},
      {"prompt_tokens": pad_id, "prompt_id": -1})
