"""The data layer: the miniature instruction world, corpora, own data, batches.

The only place TensorFlow and seqio are used, and only by the modules that
need them (tasks and seqio_vocab, TFDS reading); everything else, the
vocabularies included, imports without them.

  pipeline.make_iterator(kind, spec, ...)   resumable numpy batches
  pipeline.get_prompts(spec, split)         what prompt_id indexes
  vocab.get_vocabulary(spec)                vocabularies with their own
                                            EOS/PAD/BOS ids ("hf:DIR": a
                                            checkpoint's, hf_vocab.py)
  world.gold_judge(prompt, a, b)            evaluation only
  labelers.rank_responses(prompt, [...])    simulated labelers
  tasks                                     seqio Tasks and Mixtures

See docs/data.md.
"""
from instructrl.data.common import DataError
