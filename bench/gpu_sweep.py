"""`python -m bench.gpu_sweep`: which settings move the GPU figures (issue 7).

One process, the 1.3B shape of bench/gpu.py, each variant timed on its own
(setup, compile, 2 x 3 steps) and written as a JSON line as soon as it
exists, so a run cut off by its time limit keeps what it measured:

* SFT MFU by layer layout (scan or a Python loop over layers), remat policy
  and batch rows: bench/gpu.py's default is scan + `dots_with_no_batch_dims_
  saveable` at 8 x 2048 (39.5% of spec on an H200, 2026-11-26).
* Sampler ms per decode step by layer layout and batch: the same time per
  step at 16 rows as at 64 means the decode loop is bound by per-step
  overhead, not by the weights or the KV cache it reads.

XLA flags apply per process: run it again with XLA_FLAGS set to compare them.
`--tiny` runs the same variants on tiny shapes (CPU, seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time

from bench.gpu import SHAPES, SPEC_BF16_TFLOPS, Writer, measure

SFT_VARIANTS = (  # (scan_layers, remat_policy, rows)
    (True, "dots_with_no_batch_dims_saveable", 8),
    (False, "dots_with_no_batch_dims_saveable", 8),
    (True, "none", 8),
    (False, "none", 8),
    (True, "dots_with_no_batch_dims_saveable", 16),
    (False, "nothing_saveable", 8),
)
SAMPLE_VARIANTS = ((True, 64), (False, 64), (False, 16), (True, 16))  # (scan, rows)


def _variant(rec, make_case, rounds, reps, figures, write):
  """Builds, warms and times one variant; writes `rec` with its figures (or
  the error, e.g. out of memory) and frees it before the next."""
  try:
    case = make_case()
    case.prepare()
    m = measure(case, rounds, reps)
    rec.update(m, **figures(m["step_s"]))
  except Exception as e:  # pylint: disable=broad-except
    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  write(rec)
  gc.collect()


def run(args, write):
  import jax  # pylint: disable=g-import-not-at-top
  from bench import ours  # pylint: disable=g-import-not-at-top
  s = SHAPES[args.shape]
  on_gpu = jax.devices()[0].platform == "gpu"
  write({"figure": "meta", "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "device": str(getattr(jax.devices()[0], "device_kind", "cpu")),
         "shape": dataclasses.asdict(s)})
  mesh = ours.one_device_mesh()
  t0 = time.perf_counter()
  attn = "cudnn" if on_gpu else None
  for scan, remat, rows in SFT_VARIANTS if "sft" in args.only else ():
    if time.perf_counter() - t0 > args.budget_s:
      break
    shape = dataclasses.replace(s, sft_batch=rows)
    flops = shape.train_flops(rows, s.seq_len)
    _variant({"figure": "sft", "scan_layers": scan, "remat": remat, "rows": rows},
             lambda: ours.sft_case(shape, mesh, scan_layers=scan, remat_policy=remat,
                                   attention_impl=attn),
             2, 3, lambda t: {"tokens_per_s": rows * s.seq_len / t,
                              "mfu_spec": flops / t / 1e12 / SPEC_BF16_TFLOPS}, write)
  for scan, rows in SAMPLE_VARIANTS if "sample" in args.only else ():
    if time.perf_counter() - t0 > args.budget_s:
      break
    shape = dataclasses.replace(s, prompts=rows)
    _variant({"figure": "sample", "scan_layers": scan, "rows": rows},
             lambda: ours.sample_case(shape, mesh, scan_layers=scan),
             1, 2, lambda t: {"new_tokens_per_s": rows * s.new_tokens / t,
                              "ms_per_token_step": 1e3 * t / s.new_tokens}, write)
  write({"figure": "done", "wall_s": time.perf_counter() - t0})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
  p.add_argument("--only", default="sft,sample")
  p.add_argument("--budget-s", type=float, default=400.0)
  p.add_argument("--out", default=os.path.join(
      os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
      "gpu_sweep.jsonl"))
  args = p.parse_args(argv)
  args.shape = "tiny" if args.tiny else "1b"
  run(args, Writer(args.out))


if __name__ == "__main__":
  main()
