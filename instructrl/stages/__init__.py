"""The pipeline's stages, each a module with `build` and `run`.

  validate   every config check, before anything runs (ConfigError)
  inputs     model configs, data iterators, initial parameters
  loop       the shared host loop, checkpoints, exports
  lm         pretrain and SFT (+ sft_extras: the pretraining mix, RM selection)
  rm         the reward model (+ rm_data: comparisons of SFT samples)
  ppo        PPO and PPO-ptx
  evaluate   every model against the gold judge on the test prompts
  runner     `config.stage` or the whole pipeline

Layer 3: imports the core, `rl`, `eval` and the data layer.
"""
