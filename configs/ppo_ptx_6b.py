"""PPO-ptx of the 6.7B SFT policy against the 6B RM (the paper, Appendix C.3-4).

    python -m instructrl.main --config=configs/ppo_ptx_6b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/ppo_ptx_6b.py
    python -m instructrl.main --config=configs/ppo_ptx_6b.py:runlocal --workdir=/tmp/p

Target: v5p-128 (64 chips, 16 hosts), FSDP: a minibatch of 64 episodes is
one per chip.

A PPO run reads the `sft` and `rm` exports of its workdir: run
sft_6b.py and rm_6b.py into the same DIR first (also with :runlocal).
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").ppo_ptx_config(
      "6b", arg, topology="v5p:4x4x4", mesh=dict(fsdp=64),
      # 14 GiB per chip with full remat: keep the weight matmuls' outputs.
      remat="dots_with_no_batch_dims_saveable")
