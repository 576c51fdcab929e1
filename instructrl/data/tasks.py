"""seqio Tasks and Mixtures for every stage, the way t5x users expect them.

Importing this module registers (idempotently) with the default vocabulary,
which is trained on first use, not at import:

  instructrl_corpus          pretraining text (lm); splits train, validation
  instructrl_world_sft       demonstrations; train, validation, test
  instructrl_world_rm        comparisons; train, validation, test
  instructrl_world_prompts   PPO / evaluation prompts; train, validation, test
  instructrl_ptx             mixture: 90% SFT demonstrations, 10% corpus (the
                             paper's PPO initialisation mix, Appendix C.3)

Features: "inputs" (the prompt, no EOS; empty for corpus text) and
"targets" (the completion or text, with EOS), so the LM tasks work with
seqio.LMFeatureConverter(pack=True) (pretraining, targets only) and
seqio.PrefixLMFeatureConverter(loss_on_targets_only=True) (SFT). The rm task
has rank-2 "targets" [K, len] (each completion + EOS, 0-padded) plus
"ranks" [K] and "group" []; no stock feature converter handles it, so the
trainers use pipeline.make_iterator, which yields the same token ids.

`register_task(kind, spec, ...)` registers your own data (jsonl:, text:,
tfds:) and returns the task name.
"""
from typing import Any, Mapping, Optional

import seqio
import tensorflow as tf

from instructrl.data import common
from instructrl.data import corpus
from instructrl.data import seqio_vocab
from instructrl.data import sources
from instructrl.data import vocab as vocab_lib

TASK_NAMES = {
    "lm": "instructrl_corpus",
    "sft": "instructrl_world_sft",
    "rm": "instructrl_world_rm",
    "prompts": "instructrl_world_prompts",
}
PTX_MIXTURE = "instructrl_ptx"
PTX_RATE = 0.1  # Fraction of pretraining text in the mixture.


def _output_features(kind: str, vocab: seqio.Vocabulary):
  inputs = seqio.Feature(vocab, add_eos=False, required=False)
  if kind == "prompts":
    return {"inputs": inputs}
  if kind == "rm":
    return {"inputs": inputs,
            "targets": seqio.Feature(vocab, add_eos=False, rank=2)}
  return {"inputs": inputs, "targets": seqio.Feature(vocab, add_eos=True)}


def _as_features(kind: str, records: list[Any]) -> dict[str, Any]:
  """Python records -> columns in our feature names."""
  if kind == "lm":
    return {"inputs": [""] * len(records), "targets": [r.text for r in records]}
  if kind == "sft":
    return {"inputs": [r.prompt for r in records],
            "targets": [r.completion for r in records]}
  if kind == "prompts":
    return {"inputs": [r.prompt for r in records]}
  return {"inputs": [r.prompt for r in records],
          "targets": tf.ragged.constant([list(r.completions) for r in records]),
          "ranks": tf.ragged.constant([list(r.ranks) for r in records],
                                      dtype=tf.int32),
          "group": [r.group for r in records]}


def _records_source(kind: str, spec: str, options: Mapping[str, Any]):
  """A FunctionDataSource over `sources.load_records` (world, corpus, jsonl)."""
  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # One in-memory source: nothing to shuffle.
    records = sources.load_records(kind, spec, split, **options)
    return tf.data.Dataset.from_tensor_slices(_as_features(kind, records))
  splits = corpus.SPLITS if spec == "corpus" else common.SPLITS
  return seqio.FunctionDataSource(dataset_fn, splits=splits)


def _tfds_rename(kind: str, fields: Mapping[str, str]):
  """A preprocessor: TFDS features -> our features ("inputs", "targets")."""
  name = {ours: fields.get(ours, ours) for ours in sources.FIELDS[kind]}

  def fn(dataset):
    def convert(ex):
      if kind == "lm":
        return {"inputs": tf.constant(""), "targets": ex[name["text"]]}
      out = {"inputs": ex[name["prompt"]]}
      if kind == "sft":
        out["targets"] = ex[name["completion"]]
      elif kind == "rm":
        out["targets"] = ex[name["completions"]]
        out["ranks"] = tf.cast(ex[name["ranks"]], tf.int32)
        out["group"] = tf.cast(ex.get(name["group"], 0), tf.int32)
      return out
    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
  return fn


def _tokenize_comparisons(dataset, output_features):
  """rm: prompt -> ids; K completions -> dense [K, len] ids, each + EOS."""
  vocab = output_features["targets"].vocabulary

  def fn(ex):
    # One string at a time: not every vocabulary's encode_tf takes a vector.
    ids = tf.map_fn(lambda s: tf.cast(vocab.encode_tf(s), tf.int32),
                    ex["targets"], fn_output_signature=tf.RaggedTensorSpec(
                        [None], tf.int32, ragged_rank=0))
    eos = tf.fill([ids.nrows(), 1], vocab.eos_id)
    ids = tf.concat([ids, eos], axis=1).to_tensor(vocab.pad_id)
    return dict(ex, inputs=tf.cast(vocab.encode_tf(ex["inputs"]), tf.int32),
                targets=ids)
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _preprocessors(kind: str):
  if kind == "rm":
    return [_tokenize_comparisons]
  steps = [seqio.preprocessors.tokenize]
  if kind != "prompts":
    steps.append(seqio.preprocessors.append_eos_after_trim)
  return steps


def _resolve(vocab: Any) -> seqio.Vocabulary:
  if vocab is None or vocab == "default":
    return seqio_vocab.LazyDefaultVocabulary()
  if isinstance(vocab, str):
    vocab = vocab_lib.get_vocabulary(vocab)
  return seqio_vocab.as_seqio(vocab)


def register_task(kind: str, spec: str, *, name: Optional[str] = None,
                  vocab: Any = None, world: Optional[Mapping[str, Any]] = None,
                  tfds_data_dir: Optional[str] = None,
                  fields: Optional[Mapping[str, str]] = None,
                  cache_dir: Optional[str] = None) -> str:
  """Registers a seqio Task for `kind` data from `spec`; returns its name.

  Idempotent: a name that is already registered is left alone and returned,
  so importing or calling twice is safe. The default name is derived from
  the arguments, so different data never collide.
  """
  if kind not in sources.KINDS:
    raise ValueError(f"kind must be one of {sources.KINDS}, got {kind!r}")
  scheme, arg = sources.parse_spec(spec)
  if name is None:
    key = common.fingerprint([kind, spec, repr(sorted((world or {}).items())),
                              str(tfds_data_dir), repr(fields), str(vocab)])
    name = f"instructrl_{scheme}_{kind}_{key[:8]}"
  if name in seqio.TaskRegistry.names():
    return name
  if scheme == "tfds":
    source = seqio.TfdsDataSource(tfds_name=arg, tfds_data_dir=tfds_data_dir)
    steps = [_tfds_rename(kind, fields or {})] + _preprocessors(kind)
  else:
    options = {"world": dict(world or {}), "cache_dir": cache_dir}
    source = _records_source(kind, spec, options)
    steps = _preprocessors(kind)
  features = _output_features(kind, _resolve(vocab))
  seqio.TaskRegistry.add(name, source=source, preprocessors=steps,
                         output_features=features)
  return name


def register_defaults(vocab: Any = None, suffix: str = "") -> dict[str, str]:
  """The standard tasks and the ptx mixture (names get `suffix`)."""
  names = {}
  for kind, name in TASK_NAMES.items():
    spec = "corpus" if kind == "lm" else "world"
    names[kind] = register_task(kind, spec, name=name + suffix, vocab=vocab)
  mixture = PTX_MIXTURE + suffix
  if mixture not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(mixture, [(names["sft"], 1.0 - PTX_RATE),
                                        (names["lm"], PTX_RATE)])
  names["ptx"] = mixture
  return names


register_defaults()
