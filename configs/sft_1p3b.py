"""SFT of GPT-3 1.3B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_1p3b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/sft_1p3b.py
    python -m instructrl.main --config=configs/sft_1p3b.py:runlocal --workdir=/tmp/s

Target: v5p-16 (8 chips, 2 hosts), FSDP over the 8 chips: batch 32 is 4
rows of 2048 tokens per chip.
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").sft_config(
      "1p3b", arg, topology="v5p:2x2x2", mesh=dict(fsdp=8),
      # 8 GiB of 95 per chip with full remat: keep the weight matmuls instead.
      remat="dots_with_no_batch_dims_saveable")
