"""The data layer: the miniature instruction world, corpora, own data, batches.

The only place TensorFlow and seqio are used, and only by the modules that
need them (vocab, tasks, TFDS reading); world, labelers, corpus, jsonl,
packing, iterators and pipeline import without them.

  pipeline.make_iterator(kind, spec, ...)   resumable numpy batches
  pipeline.get_prompts(spec, split)         what prompt_id indexes
  vocab.get_vocabulary(spec)                seqio vocabularies
  world.gold_judge(prompt, a, b)            evaluation only
  labelers.rank_responses(prompt, [...])    simulated labelers
  tasks                                     seqio Tasks and Mixtures

See docs/data.md.
"""
from instructrl.data.common import DataError
from instructrl.data.common import EOS_ID
from instructrl.data.common import PAD_ID
