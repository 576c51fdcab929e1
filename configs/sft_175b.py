"""SFT of GPT-3 175B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_175b.py --workdir=DIR
    python -m instructrl.tools.aot --config=configs/sft_175b.py
    python -m instructrl.main --config=configs/sft_175b.py:runlocal --workdir=/tmp/s

Target: v5p-512 (256 chips, 64 hosts). The paper's batch of 8 rows caps the
data axes at 8, so the rest is tensor parallelism: 96 heads / 32 = 3 per
chip (a tensor axis of 64 would not divide the heads).
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
from instructrl import config_files


def get_config(arg: str = ""):
  return config_files.sibling(__file__, "gpt3_shapes.py").sft_config(
      "175b", arg, topology="v5p:4x8x8", mesh=dict(fsdp=8, tensor=32),
      # One row per data shard leaves room to keep the weight matmuls' outputs.
      remat="dots_with_no_batch_dims_saveable")
