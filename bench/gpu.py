"""`python -m bench.gpu`: the JAX benchmarks at ~1.3B parameters, bf16, one GPU.

GPT-3 XL-like shape (24 layers, width 2048, 16 heads, vocab 32000, 2048
tokens), bf16 compute with fp32 master weights, layers as a Python loop
and no remat: bench/gpu_sweep.py measured that 14% faster than `lax.scan`
with `dots_with_no_batch_dims_saveable` remat (45.0% vs 39.4% MFU on an
H200; `--scan --remat=dots_with_no_batch_dims_saveable` restores the old
setting where memory is short). Figures: the measured bf16 matmul
peak, SFT tokens/s and MFU against the 989 TFLOP/s dense bf16 spec of an
H100/H200 SXM, RM pairs/s, sampler new tokens/s, and one PPO-ptx iteration
with its phases. Each figure is written as soon as it exists, so a run cut
off by its time limit still leaves what it measured.

No TensorFlow, torch or network. `--tiny` runs the same code on tiny shapes
(CPU, seconds) as a check of the script itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

from bench.common import Shape, interleave

SPEC_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (no sparsity).

SHAPES = {
    "1b": Shape("gpt-1.3b", num_layers=24, d_model=2048, num_heads=16, vocab=32000,
                max_len=2048, dtype="bfloat16", sft_batch=8, seq_len=2048, rm_pairs=4,
                prompts=64, prompt_len=256, new_tokens=256, ppo_minibatch=16,
                ptx_rows=16, ptx_len=512),
    "tiny": Shape("tiny", num_layers=2, d_model=64, num_heads=2, max_len=48,
                  dtype="bfloat16", sft_batch=4, seq_len=32, rm_pairs=2, prompts=4,
                  prompt_len=8, new_tokens=8, ppo_minibatch=2, ptx_rows=4, ptx_len=16),
}


class Writer:
  """Appends one JSON line per figure to a file and to stdout."""

  def __init__(self, path):
    self.path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "w", encoding="utf-8").close()

  def __call__(self, rec):
    line = json.dumps(rec, sort_keys=True)
    print(line, flush=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def measure(case, rounds, reps):
  interleave([case], rounds, reps)
  return {"step_s": case.median_s, "min_s": min(case.times),
          "compile_s": case.compile_s, "first_call_s": case.first_call_s,
          "steps": len(case.times)}


def matmul_peak(n, reps):
  """Best-of-`reps` TFLOP/s of an n x n bf16 matmul (bench.ours' matmul case)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bench import ours  # pylint: disable=g-import-not-at-top
  case = ours.matmul_case(n, jnp.bfloat16)
  interleave([case], 1, reps)
  return 2.0 * n ** 3 / min(case.times) / 1e12


def _with_fallback(make, cfg_kw, write, figure):
  """Builds and warms a case with cudnn attention; falls back to XLA's."""
  if cfg_kw.get("attention_impl") == "cudnn":
    try:
      case = make(cfg_kw)
      case.prepare()
      return case, "cudnn"
    except Exception as e:  # pylint: disable=broad-except
      write({"figure": figure, "note": f"cudnn attention failed: {str(e)[:300]}"})
      gc.collect()
  kw = dict(cfg_kw, attention_impl=None)
  case = make(kw)
  case.prepare()
  return case, "xla"


def _guard(fn, write, figure):
  """Runs one figure; an error (e.g. out of memory) is written, not raised."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    write({"figure": figure, "error": f"{type(e).__name__}: {str(e)[:500]}"})
  gc.collect()


def run(args, write):
  import jax  # pylint: disable=g-import-not-at-top
  from bench import ours  # pylint: disable=g-import-not-at-top
  s = SHAPES[args.shape]
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  import flax  # pylint: disable=g-import-not-at-top
  write({"figure": "meta", "flax": flax.__version__, "device": str(getattr(dev, "device_kind", dev.platform)),
         "platform": dev.platform, "jax": jax.__version__, "shape": dataclasses.asdict(s),
         "argv": sys.argv, "params": Shape.matmul_params(s)})
  mesh = ours.one_device_mesh()
  rounds, reps = (2, 2) if args.tiny else (2, 3)
  t0 = time.perf_counter()
  left = lambda: args.budget_s - (time.perf_counter() - t0)
  base_kw = {"scan_layers": args.scan, "remat_policy": args.remat}
  train_kw = dict(base_kw, attention_impl="cudnn" if on_gpu else None)

  peak = matmul_peak(8192 if on_gpu else 512, 10)
  write({"figure": "peak", "unit": "TFLOP/s", "measured": peak,
         "spec": SPEC_BF16_TFLOPS, "n": 8192 if on_gpu else 512})

  def sft():
    case, impl = _with_fallback(lambda kw: ours.sft_case(s, mesh, **kw), train_kw,
                                write, "sft")
    m = measure(case, rounds, reps)
    tokens, flops = s.sft_batch * s.seq_len, s.train_flops(s.sft_batch, s.seq_len)
    write(dict(m, figure="sft", unit="tokens/s", value=tokens / m["step_s"],
               attention=impl, tflops=flops / m["step_s"] / 1e12,
               mfu_spec=flops / m["step_s"] / 1e12 / SPEC_BF16_TFLOPS,
               mfu_measured_peak=flops / m["step_s"] / 1e12 / peak))

  def rm():
    case, impl = _with_fallback(lambda kw: ours.rm_case(s, mesh, **kw), train_kw,
                                write, "rm")
    m = measure(case, rounds, reps)
    flops = s.train_flops(2 * s.rm_pairs, s.seq_len)
    write(dict(m, figure="rm", unit="pairs/s", value=s.rm_pairs / m["step_s"],
               attention=impl, mfu_spec=flops / m["step_s"] / 1e12 / SPEC_BF16_TFLOPS))

  def sample():
    m = measure(ours.sample_case(s, mesh, **base_kw), rounds, reps)
    write(dict(m, figure="sample", unit="new tokens/s",
               value=s.prompts * s.new_tokens / m["step_s"]))

  def ppo():
    cases = ours.ppo_cases(s, mesh, **base_kw)
    m = measure(cases[0], rounds, 1)
    for c in cases[1:]:
      c.prepare()
    interleave(cases[1:], rounds, 1)
    write(dict(m, figure="ppo", unit="s/iteration", value=m["step_s"],
               split_s={c.name: c.median_s for c in cases[1:]},
               split_compile_s={c.name: c.compile_s for c in cases[1:]}))

  # Most important first; each later one only if time is left for it.
  for name, fn, need_s in (("sft", sft, 0), ("sample", sample, 45), ("rm", rm, 60),
                           ("ppo", ppo, 90)):
    if name in args.only:
      if left() < need_s:
        write({"figure": name, "skipped": f"{left():.0f} s left of the budget"})
        continue
      _guard(fn, write, name)
  write({"figure": "done", "wall_s": time.perf_counter() - t0})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
  p.add_argument("--only", default="sft,rm,sample,ppo")
  p.add_argument("--remat", default="none")
  p.add_argument("--scan", action="store_true", help="layers under lax.scan")
  p.add_argument("--budget-s", type=float, default=270.0,
                 help="skip later figures once this much time has passed")
  p.add_argument("--out", default=os.path.join(
      os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
      "gpu_results.jsonl"))
  args = p.parse_args(argv)
  args.shape = "tiny" if args.tiny else "1b"
  args.only = args.only.split(",")
  run(args, Writer(args.out))


if __name__ == "__main__":
  main()
