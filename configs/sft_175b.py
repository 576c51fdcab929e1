"""SFT of GPT-3 175B on labeler demonstrations (the paper, Appendix C.1).

    python -m instructrl.main --config=configs/sft_175b.py --workdir=DIR
    python -m instructrl.aot --config=configs/sft_175b.py
    python -m instructrl.main --config=configs/sft_175b.py:runlocal --workdir=/tmp/s

Target: v5p-512 (256 chips, 64 hosts). The paper's batch of 8 rows caps the
data axes at 8, so the rest is tensor parallelism: 96 heads / 32 = 3 per
chip (a tensor axis of 64 would not divide the heads).
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
      "175b", arg, topology="v5p:4x8x8", mesh=dict(fsdp=8, tensor=32),
      # One row per data shard leaves room to keep the weight matmuls' outputs.
      remat="dots_with_no_batch_dims_saveable")
