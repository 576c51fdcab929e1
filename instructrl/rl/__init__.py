"""PPO as pure programs: the rollout (`rollout`) and the learner (`learner`).

Layer 1: imports the core only (losses, sampling, steps, model), never the
stages or the data layer.
"""
