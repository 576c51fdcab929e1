"""The gold-judge report: win rates with ties, intervals, the sign-off cut."""
import numpy as np
import pytest

from instructrl.eval import judge as evaluation
from instructrl.data import world


def test_win_rate_counts_ties_half_with_the_sample_sd_interval():
  w = evaluation.win_rate([1.0, 0.5, 0.5, 0.0, 1.0])
  assert w["rate"] == pytest.approx(0.6)
  sd = np.std([1.0, 0.5, 0.5, 0.0, 1.0], ddof=1)
  assert w["hi"] - w["rate"] == pytest.approx(1.96 * sd / np.sqrt(5))
  assert np.isnan(evaluation.win_rate([])["rate"])


def test_the_sign_off_cut_judges_the_answers_alone():
  """A policy that only drops the sign-off wins every prompt where the SFT
  answer is worth something, and ties all of them once the sign-off is cut."""
  prompts = world.World(world.WorldConfig(families="count", validation=10,
                                          test=10)).prompts("prompts", "test")
  refs = [p.reference for p in prompts]
  sft = [f"{r} {world.SIGN_OFF}" for r in refs[:6]] + ["zzz"] * 4
  ppo = refs[:6] + ["zzz"] * 4
  report = evaluation.summarise(prompts, {"sft": sft, "ppo": ppo}, "sft",
                                sign_off=world.SIGN_OFF)
  assert report["ppo"]["win_rate_vs_sft"]["rate"] == pytest.approx((6 + 0.5 * 4) / 10)
  assert report["ppo"]["win_rate_vs_sft_without_sign_off"]["rate"] == 0.5
  assert report["ppo"]["hallucination_rate"] == 0.0
  assert report["sft"]["hallucination_rate"] == 0.6
  assert "sign-off cut" in evaluation.table(report).splitlines()[0]
  assert evaluation.strip_suffix(f" x {world.SIGN_OFF} ", world.SIGN_OFF) == "x"
  assert evaluation.strip_suffix(f"x {world.SIGN_OFF} {world.SIGN_OFF}", world.SIGN_OFF) == "x"
  assert evaluation.strip_suffix(f"x{world.SIGN_OFF}", world.SIGN_OFF) == f"x{world.SIGN_OFF}"
  assert evaluation.strip_suffix(world.SIGN_OFF, world.SIGN_OFF) == ""
  assert "without_sign_off" not in str(evaluation.summarise(prompts, {"sft": sft}, "sft"))


def test_the_lm_tax_is_each_models_heldout_loss_minus_the_baselines():
  prompts = world.World(world.WorldConfig(families="count", validation=10,
                                          test=10)).prompts("prompts", "test")
  answers = [p.reference for p in prompts]
  by_model = {"sft": answers, "ppo": answers, "ppo_ptx": answers}
  extra = {"sft": {"heldout_lm_loss": 4.0}, "ppo": {"heldout_lm_loss": 4.25},
           "ppo_ptx": {"heldout_lm_loss": 3.9}}
  report = evaluation.summarise(prompts, by_model, "sft", extra)
  assert report["sft"]["lm_tax_vs_sft"] == 0.0
  assert report["ppo"]["lm_tax_vs_sft"] == pytest.approx(0.25)
  assert report["ppo_ptx"]["lm_tax_vs_sft"] == pytest.approx(-0.1)
  lines = evaluation.table(report).splitlines()
  assert "LM tax vs sft" in lines[0]
  assert "+0.250" in lines[2] and "-0.100" in lines[3]
  # Without the baseline's loss there is nothing to subtract from.
  report = evaluation.summarise(prompts, by_model, "sft", {"ppo": extra["ppo"]})
  assert "lm_tax_vs_sft" not in report["ppo"]
  assert "LM tax" not in evaluation.table(report)


def _naive_bootstrap(values, resamples, seed, level=0.95):
  """One resample at a time, and the quantiles by hand (linear interpolation)."""
  rng = np.random.default_rng(seed)
  means = []
  for _ in range(resamples):
    idx = rng.integers(0, len(values), len(values))
    means.append(sum(values[i] for i in idx) / len(values))
  means.sort()

  def quantile(q):
    pos = q * (resamples - 1)
    i = int(np.floor(pos))
    return means[i] + (pos - i) * (means[min(i + 1, resamples - 1)] - means[i])
  return sum(values) / len(values), quantile((1 - level) / 2), quantile((1 + level) / 2)


def test_the_bootstrap_matches_a_naive_loop():
  outcomes = [1.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5]
  got = evaluation.bootstrap_means(outcomes, 2000, seed=3)
  want = _naive_bootstrap(outcomes, 2000, seed=3)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert got[0] == pytest.approx(6.5 / 11)
  assert got[1] < got[0] < got[2]
  assert evaluation.bootstrap_means(outcomes, 2000, seed=4) != got  # The seed counts.


def test_ppo_ptx_vs_ppo_is_paired_with_ties_and_temperature_one_utility():
  """PPO-ptx right on prompts 0-5, PPO on 0-2, both wrong on 6-9: 3 wins,
  7 ties (3 both right, 4 both wrong), 0 losses; win rate (3 + 7/2) / 10
  = 0.65; gold utility (1 right, 0 wrong) differs by 3/10 on average."""
  prompts = world.World(world.WorldConfig(families="count", validation=10,
                                          test=10)).prompts("prompts", "test")
  refs = [p.reference for p in prompts]
  ptx, ppo = refs[:6] + ["zzz"] * 4, refs[:3] + ["zzz"] * 7
  by_model = {"sft": ["zzz"] * 10, "ppo": ppo, "ppo_ptx": ptx}
  sampled = {"sft": refs[:1] + ["zzz"] * 9, "ppo_ptx": refs[:5] + ["zzz"] * 5}
  report = evaluation.summarise(prompts, by_model, "sft", sampled=sampled,
                                resamples=500, seed=1)
  c = report["ppo_ptx"]["paired_vs_ppo"]
  assert (c["wins"], c["ties"], c["losses"], c["n"]) == (3, 7, 0, 10)
  assert c["rate"] == pytest.approx(0.65)
  assert c["utility_diff"]["mean"] == pytest.approx(0.3)
  outcomes = [0.5] * 3 + [1.0] * 3 + [0.5] * 4
  _, lo, hi = _naive_bootstrap(outcomes, 500, seed=1)
  assert (c["lo"], c["hi"]) == (pytest.approx(lo), pytest.approx(hi))
  _, lo, hi = _naive_bootstrap([0.0] * 3 + [1.0] * 3 + [0.0] * 4, 500, seed=1)
  assert (c["utility_diff"]["lo"], c["utility_diff"]["hi"]) == (
      pytest.approx(lo), pytest.approx(hi))
  assert "paired_vs_ppo" not in report["ppo"]
  # Ties vs SFT counted too, and T=1 utility beside greedy where sampled.
  w = report["ppo"]["win_rate_vs_sft"]
  assert (w["wins"], w["ties"], w["losses"]) == (3, 7, 0)
  assert report["sft"]["gold_utility_t1"] == pytest.approx(0.1)
  assert report["ppo_ptx"]["gold_utility_t1"] == pytest.approx(0.5)
  assert report["ppo_ptx"]["gold_utility"] == pytest.approx(0.6)
  assert "gold_utility_t1" not in report["ppo"]
  lines = evaluation.table(report).splitlines()
  assert "W/T/L" in lines[0] and "gold u T=1" in lines[0]
  assert "3/7/0" in lines[2] and "0.500" in lines[3]
  assert lines[-1].startswith("ppo_ptx vs ppo, same prompts (paired bootstrap, 500")
  assert "win 0.650" in lines[-1] and "W/T/L 3/7/0" in lines[-1]
  assert "gold u diff +0.300" in lines[-1]
