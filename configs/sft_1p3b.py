"""SFT of GPT-3 1.3B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_1p3b.py --workdir=DIR
    python -m instructrl.aot --config=configs/sft_1p3b.py
    python -m instructrl.main --config=configs/sft_1p3b.py:runlocal --workdir=/tmp/s

Target: v5p-16 (8 chips, 2 hosts), FSDP over the 8 chips: batch 32 is 4
rows of 2048 tokens per chip.
Variants: `runlocal` (a tiny model on the CPU, seconds).
"""
import importlib.util
import os


def _load_helper():
  """configs/gpt3_shapes.py, loaded by path (configs/ is no package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt3_shapes.py")
  spec = importlib.util.spec_from_file_location("instructrl_gpt3_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  return _load_helper().sft_config(
      "1p3b", arg, topology="v5p:2x2x2", mesh=dict(fsdp=8),
      # 8 GiB of 95 per chip with full remat: keep the weight matmuls instead.
      remat="dots_with_no_batch_dims_saveable")
