"""The 6B reward model on ranked comparisons (the paper, Appendix C.2).

    python -m instructrl.main --config=configs/rm_6b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/rm_6b.py
    python -m instructrl.main --config=configs/rm_6b.py:runlocal --workdir=/tmp/r

One 6B RM serves every policy size, as in the paper (175B RMs were
unstable); its export also initialises the PPO value model. Target: v5p-64
(32 chips, 8 hosts), FSDP: 64 prompts x 9 completions of 2048 tokens is 18
sequences per chip.
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").rm_config(
      arg, topology="v5p:2x4x4", mesh=dict(fsdp=32))
