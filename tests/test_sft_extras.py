"""SFT options: the pretraining mix's row count and resumable mixed batches."""
import numpy as np
import pytest

from instructrl.stages import sft_extras


class _Counter:
  """A stand-in iterator with the BatchIterator state protocol."""

  def __init__(self, tag, rows):
    self.tag, self.rows, self.step = tag, rows, 0
    self.batches_per_epoch = 10

  def __next__(self):
    self.step += 1
    return {"tokens": np.full((self.rows, 3), self.tag * 100 + self.step)}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, s):
    self.step = s["step"]


def test_ptx_rows_is_the_requested_share_in_whole_device_rows():
  assert sft_extras.ptx_rows(32, 0.0, 4) == 0
  # 10% of the mixed batch: 32 * 0.1 / 0.9 = 3.6 rows -> 4 (a multiple of 4).
  assert sft_extras.ptx_rows(32, 0.1, 4) == 4
  assert sft_extras.ptx_rows(90, 0.1, 1) == 10
  assert sft_extras.ptx_rows(8, 0.01, 2) == 2  # Never zero once asked for.


def test_mixed_batches_concatenate_and_resume_exactly():
  it = sft_extras.mixed_batches(_Counter(1, 4), _Counter(2, 1))
  first = next(it)
  assert first["tokens"].shape == (5, 3)
  np.testing.assert_array_equal(first["tokens"][:, 0], [101] * 4 + [201])
  state = it.get_state()
  expected = next(it)
  again = sft_extras.mixed_batches(_Counter(1, 4), _Counter(2, 1))
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["tokens"], expected["tokens"])


def test_each_pretraining_row_weighs_as_much_as_an_average_sft_row():
  sft = {"tokens": np.zeros((4, 8), np.int32),
         "loss_mask": np.array([[1] * 2 + [0] * 6, [1] * 4 + [0] * 4] * 2, np.float32)}
  ptx = {"tokens": np.ones((1, 8), np.int32), "loss_mask": np.ones((1, 8), np.float32)}
  mixed = sft_extras._concat_rows(sft, ptx)  # pylint: disable=protected-access
  np.testing.assert_allclose(mixed["loss_mask"][:4], sft["loss_mask"])
  # Average SFT row: 3 loss tokens; the pretraining row's 8 tokens weigh 3 in all.
  np.testing.assert_allclose(mixed["loss_mask"][4], np.full(8, 3 / 8))
  share = float(mixed["loss_mask"][4:].sum() / mixed["loss_mask"].sum())
  assert share == pytest.approx(0.2)  # 1 row of 5.
  ints = sft_extras._concat_rows(  # pylint: disable=protected-access
      dict(sft, loss_mask=sft["loss_mask"].astype(np.int32)),
      dict(ptx, loss_mask=ptx["loss_mask"].astype(np.int32)))
  np.testing.assert_allclose(ints["loss_mask"][4], np.full(8, 3 / 8))
