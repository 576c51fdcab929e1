"""The best-of-N figures of `instructrl.tools.probe` on hand-made numbers."""
import numpy as np

from instructrl.tools import probe


def test_selection_stats_pins_numbers():
  utility = [[0.0, 1.0, 0.5],   # RM picks 0.5 (score 3), oracle 1.0
             [0.2, 0.2, 0.2],   # no variation: left out of the correlation
             [0.0, 0.0, 0.0]]   # nothing useful
  scores = [[1.0, 2.0, 3.0],
            [5.0, 0.0, 0.0],
            [0.0, 9.0, 9.0]]    # ties go to the first highest
  st = probe.selection_stats(utility, scores)
  assert np.isclose(st["sample"], (1.5 + 0.6) / 9)
  assert np.isclose(st["oracle"], (1.0 + 0.2 + 0.0) / 3)
  assert np.isclose(st["by_rm"], (0.5 + 0.2 + 0.0) / 3)
  assert np.isclose(st["corr"], np.corrcoef([0.0, 1.0, 0.5], [1.0, 2.0, 3.0])[0, 1])
  assert np.isclose(st["any_positive"], 2 / 3)


def test_selection_stats_without_variation_has_no_correlation():
  st = probe.selection_stats([[1.0, 1.0]], [[0.0, 2.0]])
  assert np.isnan(st["corr"]) and st["by_rm"] == st["oracle"] == 1.0


def test_selection_stats_best_of_four_and_right_samples():
  utility = [[0.0, 0.2, 0.1, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0, 0.0]]
  scores = [[0.0, 1.0, 2.0, 0.0, 9.0], [3.0, 0.0, 0.0, 0.0, 0.0]]
  exact = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
  st = probe.selection_stats(utility, scores, exact)
  assert np.isclose(st["by_rm"], (1.0 + 0.5) / 2)
  assert np.isclose(st["by_rm_small"], (0.1 + 0.5) / 2)  # sample 5 unseen
  assert st["any_exact"] == 0.5
