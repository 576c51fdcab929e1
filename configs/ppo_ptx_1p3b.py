"""PPO-ptx of the 1.3B SFT policy against the 6B RM (the paper, Appendix C.3-4).

    python -m instructrl.main --config=configs/ppo_ptx_1p3b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/ppo_ptx_1p3b.py
    python -m instructrl.main --config=configs/ppo_ptx_1p3b.py:runlocal --workdir=/tmp/p

Four models: the 1.3B policy (+ its EMA) and frozen SFT reference, the
frozen 6B RM and the 6B value model (config.rm_model). Target: v5p-64 (32
chips), FSDP: a minibatch of 64 episodes is 2 per chip.

A PPO run reads the `sft` and `rm` exports of its workdir: run
sft_1p3b.py and rm_6b.py into the same DIR first (also with :runlocal).
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").ppo_ptx_config(
      "1p3b", arg, topology="v5p:2x4x4", mesh=dict(fsdp=32),
      # The learner's 14 GiB per chip with full remat leaves room to keep the
      # weight matmuls' outputs of both the policy and the value model.
      remat="dots_with_no_batch_dims_saveable")
