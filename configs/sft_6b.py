"""SFT of GPT-3 6.7B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_6b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/sft_6b.py
    python -m instructrl.main --config=configs/sft_6b.py:runlocal --workdir=/tmp/s

Target: v5p-64 (32 chips, 8 hosts), FSDP over the 32 chips: batch 32 is one
row of 2048 tokens per chip.
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").sft_config(
      "6b", arg, topology="v5p:2x4x4", mesh=dict(fsdp=32),
      remat="dots_with_no_batch_dims_saveable")
