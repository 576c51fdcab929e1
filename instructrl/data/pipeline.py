"""The trainers' entry point: data spec -> tokens -> resumable numpy batches.

    it = make_iterator("sft", "world", "train", seq_len=128,
                       batching=Batching(batch_size=32, seed=0),
                       read=ReadOptions(vocab="default"))
    batch = next(it)          # dict of numpy arrays, this process's rows
    state = it.get_state()    # save with the checkpoint; it.set_state(state)

Data is read and validated once (sources.py), tokenized once with the
vocabulary (vocab.py: its own EOS, PAD and BOS; no TensorFlow), laid out as a fixed-shape table (packing.py) and batched by
index (iterators.py). This keeps everything in host memory, which is right
for this project's sizes (the default world is ~30k strings, the corpus
~0.45M tokens); docs/data.md discusses very large datasets.

Batch formats (B = batch_size / process_count):
  lm, sft  tokens, targets, segment_ids, positions int32 [B, T];
           loss_mask float32 [B, T]
  rm       tokens, segment_ids, positions int32 [B, K_max, T];
           ranks int32 [B, K_max] (lower preferred); valid bool [B, K_max];
           group int32 [B]
  prompts  prompt_tokens int32 [B, L] (left-padded); prompt_mask bool [B, L];
           prompt_id int32 [B] (-1 for padding rows)
"""
import dataclasses
import hashlib
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from instructrl.data import chat
from instructrl.data import common
from instructrl.data import iterators
from instructrl.data import packing
from instructrl.data import sources
from instructrl.data import vocab as vocab_lib
from instructrl.data import world as world_lib

KINDS = sources.KINDS
K_MAX = 9


def resolve_vocab(vocab: Any, cache_dir: Optional[str] = None) -> vocab_lib.Vocabulary:
  """A vocabulary from itself or a spec string ("default", "hf:DIR", ...)."""
  if isinstance(vocab, str):
    return vocab_lib.get_vocabulary(vocab, cache_dir)
  return vocab


def _check(policy, ok: bool, where: str, what: str) -> bool:
  if not ok:
    policy.handle(common.DataError(where, what))
  return ok


def _sft_sequences(records, vocab, chat_template: bool, policy):
  """{index: (ids, trained flags)} of the sft records that tokenize, and
  {index: what the length counts} for the length message."""
  demos = [i for i, r in enumerate(records) if isinstance(r, common.Demo)]
  texts = [i for i, r in enumerate(records) if isinstance(r, common.Document)]
  seqs, what = {}, {}
  prompts = vocab.encode_batch([records[i].prompt for i in demos])
  answers = vocab.encode_batch([records[i].completion for i in demos])
  for i, p, c in zip(demos, prompts, answers):
    p = vocab.prefix + p
    seqs[i] = (p + c + [vocab.eos_id], [False] * len(p) + [True] * (len(c) + 1))
    what[i] = "prompt + completion + EOS"
  for i, ids in zip(texts, vocab.encode_batch([records[i].text for i in texts])):
    seq = vocab.prefix + ids + [vocab.eos_id]
    seqs[i], what[i] = (seq, [True] * len(seq)), "text + EOS"
  for i, r in enumerate(records):
    if isinstance(r, common.Chat):
      try:
        seqs[i] = (chat.template_sequence(vocab, r.messages, r.where)
                   if chat_template else chat.plain_sequence(vocab, r.messages))
        what[i] = "the conversation"
      except common.DataError as e:
        policy.handle(e)
  return seqs, what


def _prompt_ids(records, vocab, chat_template: bool, policy) -> dict[int, list[int]]:
  """{index: ids} of the prompts that tokenize (BOS first where added)."""
  plain = [i for i, r in enumerate(records) if not r.messages]
  out = {i: vocab.prefix + ids for i, ids in zip(
      plain, vocab.encode_batch([records[i].prompt for i in plain]))}
  for i, r in enumerate(records):
    if r.messages:
      try:
        out[i] = (chat.template_prompt(vocab, r.messages, r.where) if chat_template
                  else chat.plain_prompt(vocab, r.messages))
      except common.DataError as e:
        policy.handle(e)
  return out


def _tokenize(kind: str, records: list[Any], vocab: vocab_lib.Vocabulary,
              seq_len: int, k_max: int, policy: common.ErrorPolicy,
              chat_template: bool = False) -> dict[str, np.ndarray]:
  """Encodes records, enforces lengths and lays out the table."""
  eos, pad, prefix = vocab.eos_id, vocab.pad_id, vocab.prefix
  if kind == "lm":
    docs = vocab.encode_batch([r.text for r in records])
    return packing.pack_lm([prefix + d for d in docs], seq_len, eos_id=eos,
                           pad_id=pad)
  if kind == "prompts":
    prompts = _prompt_ids(records, vocab, chat_template, policy)
    keep = [i for i, p in sorted(prompts.items()) if _check(
        policy, len(p) <= seq_len, records[i].where, f"the prompt is {len(p)} "
        f"tokens, longer than the maximum prompt length {seq_len}")]
    return packing.prompt_rows([prompts[i] for i in keep], keep, seq_len,
                               pad_id=pad)
  if kind == "sft":
    seqs, what = _sft_sequences(records, vocab, chat_template, policy)
    keep = [i for i in sorted(seqs) if _check(
        policy, len(seqs[i][0]) <= seq_len, records[i].where, f"{what[i]} is "
        f"{len(seqs[i][0])} tokens, longer than seq_len {seq_len}")]
    return packing.sequence_rows([seqs[i][0] for i in keep],
                                 [seqs[i][1] for i in keep], seq_len, pad_id=pad)
  prompts = [prefix + p for p in vocab.encode_batch([r.prompt for r in records])]
  flat = vocab.encode_batch([c for r in records for c in r.completions])
  keep, completions, start = [], [], 0
  for i, r in enumerate(records):
    cs = flat[start:start + len(r.completions)]
    start += len(cs)
    longest = len(prompts[i]) + max(len(c) for c in cs) + 1
    if (_check(policy, len(cs) <= k_max, r.where,
               f"K = {len(cs)} completions, more than k_max = {k_max}") and
        _check(policy, longest <= seq_len, r.where,
               f"prompt + completion + EOS is {longest} tokens, longer than "
               f"seq_len {seq_len}")):
      keep.append(i)
      completions.append(cs)
  return packing.rm_rows([prompts[i] for i in keep], completions,
                         [records[i].ranks for i in keep],
                         [records[i].group for i in keep], seq_len, k_max,
                         eos_id=eos, pad_id=pad)


def _fingerprint(table: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for key in sorted(table):
    h.update(key.encode())
    h.update(str(table[key].shape).encode())
    h.update(np.ascontiguousarray(table[key]).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How records are read and tokenized, the same for every split.

  vocab: a vocab.Vocabulary, or a spec for vocab.get_vocabulary.
  world: WorldConfig fields for "world" specs, e.g. {"seed": 0, "sft": 3000}.
  on_error: "raise" a DataError at the first bad record, or "skip" bad
    records (counted in `it.info["skipped"]`, logged as a warning).
  cache_dir: vocabulary and corpus cache.
  tfds_data_dir: TFDS data dir for "tfds:" specs.
  fields: TFDS only: our field name -> the dataset's feature name.
  chat_template: render "messages" records with the tokenizer's chat
    template (chat.py; needs jinja2 and an hf: vocabulary with one), not
    plainly.
  """
  vocab: Any = "default"
  world: Optional[Mapping[str, Any]] = None
  on_error: str = "raise"
  cache_dir: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  fields: Optional[Mapping[str, str]] = None
  chat_template: bool = False


@dataclasses.dataclass(frozen=True)
class Batching:
  """How an example table becomes this process's batches.

  batch_size: the GLOBAL batch size (divisible by process_count).
  seed: shuffling seed (each epoch is a fresh permutation of it).
  infinite: cycle forever; False: one pass with a padded last batch.
  shuffle: default: shuffle when infinite, keep order for one pass.
  process_index, process_count: this process, and the processes sharing a
    global batch.
  """
  batch_size: int
  seed: int = 0
  infinite: bool = True
  shuffle: Optional[bool] = None
  process_index: int = 0
  process_count: int = 1


def make_table(kind: str, spec: str, split: str = "train", *, seq_len: int,
               read: ReadOptions = ReadOptions(), k_max: int = K_MAX,
               groups: Optional[Sequence[int]] = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The example table of a dataset and facts about it (see make_iterator).

  Returns:
    (table, info): the arrays (with a padding row last) and a dict with
    "fingerprint", "examples", "skipped" and, for lm, "tokens".
  """
  policy = common.ErrorPolicy(read.on_error)
  records = sources.load_records(
      kind, spec, split, world=read.world, cache_dir=read.cache_dir,
      tfds_data_dir=read.tfds_data_dir, fields=read.fields, policy=policy)
  if kind == "rm" and groups is not None:
    allowed = set(int(g) for g in groups)
    records = [r for r in records if r.group in allowed]
  table, info = table_from_records(
      kind, records, seq_len=seq_len, vocab=resolve_vocab(read.vocab, read.cache_dir),
      k_max=k_max, policy=policy, name=f"{spec} ({kind}, {split})",
      chat_template=read.chat_template)
  info.update(spec=spec, split=split)
  return table, info


def table_from_records(kind: str, records: Sequence[Any], *, seq_len: int,
                       vocab: Any, k_max: int = K_MAX,
                       policy: Optional[common.ErrorPolicy] = None,
                       name: str = "records", chat_template: bool = False
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Tokenizes in-memory records (common.Demo, Comparison, ...) to a table.

  This is how later stages batch data they made themselves, e.g. policy
  samples ranked by `world.label_comparisons`.
  """
  policy = policy or common.ErrorPolicy()
  if not records:
    raise common.DataError(name, f"no {kind} records")
  table = _tokenize(kind, list(records), resolve_vocab(vocab), seq_len, k_max,
                    policy, chat_template)
  policy.report(name)
  n = len(next(iter(table.values()))) - 1
  if n == 0:
    raise common.DataError(name, f"every {kind} record was skipped")
  info = {"kind": kind, "examples": n, "records": len(records),
          "skipped": len(policy.skipped), "fingerprint": _fingerprint(table)}
  if kind == "lm":
    info["tokens"] = int(table["loss_mask"].sum())
  return table, info


def make_iterator(kind: str, spec: str, split: str = "train", *, seq_len: int,
                  batching: Batching, read: ReadOptions = ReadOptions(),
                  k_max: int = K_MAX, groups: Optional[Sequence[int]] = None
                  ) -> iterators.BatchIterator:
  """A deterministic, resumable iterator of this process's batch rows.

  Args:
    kind: "lm" (packed), "sft", "rm" or "prompts".
    spec: "world", "corpus", "jsonl:PATH", "text:PATH" or "tfds:NAME"
      (sources.py); PATH may contain "{split}".
    split: "train", "validation" or "test".
    seq_len: T for lm/sft/rm; the prompt length L for prompts.
    batching: batch size, shuffling and this process's share (`Batching`).
    read: vocabulary, world and error policy (`ReadOptions`).
    k_max: completions slots per rm row (K is padded to it).
    groups: rm only: keep comparisons of these labeler groups.

  Returns:
    A BatchIterator: `next(it)`, `it.get_state()`, `it.set_state(s)`,
    `it.step`, `it.epoch`, `it.info`.
  """
  table, info = make_table(kind, spec, split, seq_len=seq_len, read=read,
                           k_max=k_max, groups=groups)
  return batch_iterator(table, info, batching)


def iterator_from_records(kind: str, records: Sequence[Any], *, seq_len: int,
                          batching: Batching, vocab: Any, k_max: int = K_MAX,
                          on_error: str = "raise") -> iterators.BatchIterator:
  """make_iterator for in-memory records (same arguments and batches)."""
  table, info = table_from_records(kind, records, seq_len=seq_len,
                                   vocab=vocab, k_max=k_max,
                                   policy=common.ErrorPolicy(on_error))
  return batch_iterator(table, info, batching)


def batch_iterator(table, info, b: Batching) -> iterators.BatchIterator:
  """Batches of an example table (`make_table`'s output)."""
  return iterators.BatchIterator(
      table, batch_size=b.batch_size, seed=b.seed,
      shuffle=b.infinite if b.shuffle is None else b.shuffle, infinite=b.infinite,
      process_index=b.process_index, process_count=b.process_count,
      fingerprint=info["fingerprint"], info=info)


def get_prompts(spec: str, split: str, *,
                world: Optional[Mapping[str, Any]] = None,
                on_error: str = "raise",
                **kwargs) -> list[Union[world_lib.Prompt, str]]:
  """The prompt list that `prompt_id` indexes, for decoding and judging.

  For "world" these are `world.Prompt` objects (text, family, reference,
  `utility(response)`; pass them to `world.gold_judge`); for other specs,
  the prompt strings. Pass the `on_error` (and TFDS options) that the
  iterator got, so that both read the same list.
  """
  if sources.parse_spec(spec)[0] == "world":
    return world_lib.get_world(
        world_lib.WorldConfig.from_dict(world)).prompts("prompts", split)
  records = sources.load_records("prompts", spec, split,
                                 policy=common.ErrorPolicy(on_error), **kwargs)
  return [r.prompt for r in records]
