"""Deterministic, resumable batch iterators over an in-memory example table.

The data is an infinite stream of epochs (or one pass): epoch e visits the
examples in the order `permutation(seed, e)`, and global batch i holds
stream positions [i * B, (i + 1) * B). So the whole state is the step i:
saving it with a checkpoint and restoring it gives back exactly the batch
that would have come next, on any number of processes. Batches may straddle
an epoch boundary; none is ever short.

Each process gets only its rows of each global batch (rows
[p * B / P, (p + 1) * B / P)), ready for
`jax.make_array_from_process_local_data`.
"""
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from instructrl.data import common

_STATE_VERSION = 1


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Batches of a fixed table (packing.py) with a small, JSON-able state.

  Attributes:
    step: global batches produced so far (the next batch is number `step`).
    epoch: the epoch the next batch starts in.
    num_examples: examples in the table (without the padding row).
    fingerprint: identifies the data; a state only restores onto the same.
  """

  def __init__(self, table: Mapping[str, np.ndarray], *, batch_size: int,
               seed: int = 0, shuffle: bool = True, infinite: bool = True,
               process_index: int = 0, process_count: int = 1,
               fingerprint: str = "", info: Optional[dict[str, Any]] = None):
    """Wraps `table`, whose last row is padding (see packing.py).

    Args:
      table: name -> array with the example axis first, plus a padding row.
      batch_size: GLOBAL batch size; must divide by `process_count`.
      seed: seeds the per-epoch permutations.
      shuffle: permute each epoch (False: the table's order).
      infinite: cycle through epochs forever; False: one pass, the last
        batch filled with padding rows.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing each global batch.
      fingerprint: content hash of the data, stored in the state.
      info: extra facts for humans (not in the state).
    """
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"the global batch size ({batch_size}) must be a "
                       f"positive multiple of process_count ({process_count})")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in "
                       f"[0, {process_count})")
    sizes = {len(a) for a in table.values()}
    if len(sizes) != 1 or sizes.pop() < 2:
      raise common.DataError(fingerprint or "data", "no examples to batch")
    self._table = dict(table)
    self.num_examples = len(next(iter(table.values()))) - 1
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self._offset = process_index * self.local_batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.infinite = infinite
    self.fingerprint = fingerprint
    self.info = dict(info or {})
    self.step = 0
    self._perms: dict[int, np.ndarray] = {}

  @property
  def epoch(self) -> int:
    return self.step * self.batch_size // self.num_examples

  @property
  def batches_per_epoch(self) -> float:
    return self.num_examples / self.batch_size

  def __len__(self) -> int:
    """Batches in one pass (the last one padded)."""
    return -(-self.num_examples // self.batch_size)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch])
        self._perms[epoch] = rng.permutation(self.num_examples)
      else:
        self._perms[epoch] = np.arange(self.num_examples)
    return self._perms[epoch]

  def _indices(self, step: int) -> np.ndarray:
    """Table rows of this process's part of global batch `step`."""
    start = step * self.batch_size + self._offset
    stream = np.arange(start, start + self.local_batch_size)
    epochs, within = np.divmod(stream, self.num_examples)
    rows = np.empty_like(stream)
    for e in np.unique(epochs):
      sel = epochs == e
      rows[sel] = self._perm(int(e))[within[sel]]
    if not self.infinite:
      rows[stream >= self.num_examples] = self.num_examples  # Padding row.
    return rows

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.infinite and self.step * self.batch_size >= self.num_examples:
      raise StopIteration
    rows = self._indices(self.step)
    self.step += 1
    return {k: v[rows] for k, v in self._table.items()}

  def get_state(self) -> dict[str, Any]:
    """Small, JSON-serialisable: save it next to the model checkpoint."""
    return {"version": _STATE_VERSION, "step": self.step, "seed": self.seed,
            "num_examples": self.num_examples, "batch_size": self.batch_size,
            "shuffle": self.shuffle, "fingerprint": self.fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes at `state`; the data and batch size must be the same."""
    mine = self.get_state()
    for key in ("fingerprint", "num_examples", "batch_size", "shuffle"):
      if state.get(key) != mine[key]:
        raise common.DataError(
            "iterator state", f"saved for other data ({key} "
            f"{state.get(key)!r}, this iterator has {mine[key]!r})")
    self.seed = int(state["seed"])
    self._perms.clear()
    self.step = int(state["step"])
