"""PPO-ptx of the 175B SFT policy against the 6B RM (the paper, Appendix C.3-4).

    python -m instructrl.main --config=configs/ppo_ptx_175b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/ppo_ptx_175b.py
    python -m instructrl.main --config=configs/ppo_ptx_175b.py:runlocal --workdir=/tmp/p

Target: v5p-1024 (512 chips, 128 hosts): FSDP 64 x tensor 8, so a minibatch
of 64 episodes is one row per data shard and 96 heads split 12 per chip.

A PPO run reads the `sft` and `rm` exports of its workdir: run
sft_175b.py and rm_6b.py into the same DIR first (also with :runlocal).
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").ppo_ptx_config(
      "175b", arg, topology="v5p:8x8x8", mesh=dict(fsdp=64, tensor=8))
