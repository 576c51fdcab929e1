"""Shapes, timing and reporting shared by the CPU and GPU benchmarks.

Timing rule (the machine is shared and noisy): every figure is a median of
per-step wall times taken after a warm-up, and when two implementations are
compared their steps are interleaved round by round in one process, so a
burst of load from a neighbour hits both sides alike and the ratio survives.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark shape: a GPT-2-like model plus the batch of each phase."""
  name: str
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  vocab: int = 256
  max_len: int = 128
  dtype: str = "float32"
  sft_batch: int = 8
  seq_len: int = 128
  rm_pairs: int = 8
  prompts: int = 16
  prompt_len: int = 32
  new_tokens: int = 64
  ppo_minibatch: int = 8
  ptx_rows: int = 16  # PPO-ptx pretraining rows per iteration (0 = plain PPO).
  ptx_len: int = 64

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def matmul_params(self) -> int:
    """Parameters that take part in a matmul per token: the blocks plus the
    (tied) LM head; position embeddings, norms and biases are lookups or
    elementwise and are left out, as in Kaplan et al. (2020)."""
    d = self.d_model
    return self.num_layers * 12 * d * d + self.vocab * d

  def train_flops(self, batch: int, seq: int) -> float:
    """Model FLOPs of one training step: 6*N per token plus attention's
    12*L*d*T per token (PaLM, appendix B; causal masking not discounted)."""
    tokens = batch * seq
    return (6.0 * self.matmul_params() * tokens
            + 12.0 * self.num_layers * self.d_model * seq * tokens)


SHAPES = {
    # The reference shape.
    "ref": Shape("ref"),
    # Same model, wider: the SFT MFU figure (GPT-2's 64-wide heads).
    "w512": Shape("w512", d_model=512, num_heads=8),
    # Seconds-long smoke test of the harness itself.
    "tiny": Shape("tiny", num_layers=2, d_model=64, num_heads=2, max_len=48,
                  sft_batch=4, seq_len=32, rm_pairs=2, prompts=4, prompt_len=8,
                  new_tokens=8, ppo_minibatch=2, ptx_rows=4, ptx_len=16),
}


@dataclasses.dataclass
class Case:
  """One timed thing: `setup()` builds and warms it, `step()` runs one unit of
  work to completion (the caller times it)."""
  name: str
  side: str  # "ours" or "torch".
  setup: Callable[[], None]
  step: Callable[[], None]
  first_call_s: float = float("nan")
  times: list = dataclasses.field(default_factory=list)

  def prepare(self):
    self.setup()
    t = time.perf_counter()
    self.step()  # Traces and compiles (JAX) or allocates (torch).
    self.first_call_s = time.perf_counter() - t
    self.step()  # A second warm-up: allocator and caches settle.

  @property
  def median_s(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")

  @property
  def compile_s(self) -> float:
    """First call minus a steady step: trace + compile for JAX."""
    return max(self.first_call_s - self.median_s, 0.0)


def interleave(cases: list[Case], rounds: int, steps_per_round: int) -> None:
  """Times `steps_per_round` steps of each case, in turn, `rounds` times."""
  for c in cases:
    if not c.times and c.first_call_s != c.first_call_s:  # NaN: not prepared.
      c.prepare()
  for _ in range(rounds):
    for c in cases:
      for _ in range(steps_per_round):
        t = time.perf_counter()
        c.step()
        c.times.append(time.perf_counter() - t)


def machine_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "jax": jax.__version__,
          "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}"}


def write_jsonl(path: str, records: list[dict]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")


def fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and x != x):
    return "-"
  if isinstance(x, float):
    if abs(x) >= 100:
      return f"{x:,.0f}"
    return f"{x:.{digits}g}"
  return str(x)


def table(rows: list[dict], cols: list[str]) -> str:
  """A plain fixed-width table (also valid markdown)."""
  cells = [[fmt(r.get(c)) for c in cols] for r in rows]
  width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"
  out = [line(cols), "|" + "|".join("-" * (w + 2) for w in width) + "|"]
  out += [line(row) for row in cells]
  return "\n".join(out)
