"""SFT of GPT-3 6.7B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_6b.py --workdir=DIR
    python -m instructrl.aot --config=configs/sft_6b.py
    python -m instructrl.main --config=configs/sft_6b.py:runlocal --workdir=/tmp/s

Target: v5p-64 (32 chips, 8 hosts), FSDP over the 32 chips: batch 32 is one
row of 2048 tokens per chip.
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
      "6b", arg, topology="v5p:2x4x4", mesh=dict(fsdp=32),
      remat="dots_with_no_batch_dims_saveable")
