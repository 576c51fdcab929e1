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
