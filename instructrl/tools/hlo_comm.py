"""Bytes each chip moves over the interconnect, read from a compiled program's HLO.

XLA's `cost_analysis` counts no collective traffic, and a decode loop's body
is one computation executed once per token, so we walk the optimised,
SPMD-partitioned HLO text ourselves (shapes in it are per device): every
collective's result bytes, times the trip counts of the while loops around
it, times the fraction a ring algorithm moves for a group of `g` devices:

  all-gather          R (g-1)/g      R = the gathered (result) bytes
  reduce-scatter      R (g-1)        R = one device's share of the result
  all-reduce          2 R (g-1)/g    reduce-scatter, then all-gather
  all-to-all          R (g-1)/g
  collective-permute  R

These are the bytes a device receives (= sends) on a ring; a torus with
several links per chip runs them in parallel, so `bytes / ICI bandwidth`
(bidirectional, per chip) is a lower bound on the time, not an estimate of
latency-bound small collectives. Async pairs (`*-start`/`*-done`) are
counted once, at `-done`, whose shape is the result.

No library reads this: XLA's own HLO cost model is not exposed by jax, and
the profiler needs the chips. The parser handles what the CPU and TPU
compilers print: `replica_groups={{0,1},{2,3}}`, the iota form `[2,4]<=[8]`
and the mesh form `mesh['x'=8,'y'=1] {'x'}`; trip counts from
`known_trip_count`, else from the loop condition's bound and
`known_init_step`. An unknown trip count counts as 1 and is reported.
"""
from __future__ import annotations

import collections
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
         "collective-permute")

_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|"
                    r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (a tuple sums its arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in DTYPE_BYTES:
      total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def group_size(attrs: str, num_devices: int) -> int:
  """Devices per replica group of one collective."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=8,'axis_1'=1] {'axis_0'}: the named axes' sizes.
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:  # Iota form [groups, size]<=[...].
    return int(m.group(2))
  m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
  if m:
    return len([x for x in m.group(1).strip("{}").split(",") if x.strip()])
  m = re.search(r"source_target_pairs=", attrs)
  return 2 if m else num_devices  # Empty groups: all devices.


def moved_bytes(kind: str, result_bytes: int, g: int) -> float:
  if g <= 1:
    return 0.0
  return {"all-gather": result_bytes * (g - 1) / g,
          "reduce-scatter": result_bytes * (g - 1),
          "all-reduce": 2 * result_bytes * (g - 1) / g,
          "all-to-all": result_bytes * (g - 1) / g,
          "collective-permute": float(result_bytes)}[kind]


def parse(text: str) -> tuple[dict[str, list[tuple]], str]:
  """HLO text -> ({computation: [(name, shape, op, rest)]}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = comps.setdefault(m.group(1), [])
      if line.startswith("ENTRY"):
        entry = m.group(1)
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if m:
      current.append(m.groups())
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def trip_count(rest: str, comps: dict) -> int | None:
  """A while loop's trip count, from XLA's annotation or its condition."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", rest)
  body = comps.get(cond.group(1), ()) if cond else ()
  bounds = [int(c) for _, shape, op, args in body
            if op == "constant" and shape.startswith(("s", "u"))
            for c in re.findall(r"^(-?\d+)\)", args)]
  init = re.search(r'"known_init_step":\{"init":"(-?\d+)","step":"(\d+)"', rest)
  if len(bounds) != 1:
    return None
  if init:
    start, step = int(init.group(1)), int(init.group(2))
    return max(0, -(-(bounds[0] - start) // step))
  # XLA:TPU drops the annotation; jax's scan and fori_loop count from 0 by 1
  # while `i < n`, which is the only loop shape a lone `compare LT` takes.
  lt = any(op == "compare" and "direction=LT" in args for _, _, op, args in body)
  return bounds[0] if lt else None


def collective_bytes(text: str, num_devices: int) -> dict:
  """Per-device collective traffic of one execution of the program.

  Returns {"total": bytes, "by_kind": {kind: bytes}, "count": {kind: static
  ops executed}, "loops": [(trip count, bytes per iteration)], "unknown_trips": n}.
  """
  comps, entry = parse(text)
  by_kind = collections.Counter()
  count = collections.Counter()
  loops, unknown = [], [0]

  def walk(name: str, mult: float) -> float:
    moved = 0.0
    for _, shape, op, rest in comps.get(name, ()):
      kind = op[:-5] if op.endswith("-done") else op
      if kind in KINDS and not op.endswith("-start"):
        b = moved_bytes(kind, shape_bytes(shape), group_size(rest, num_devices))
        by_kind[kind] += b * mult
        count[kind] += mult
        moved += b
      if op == "while":
        n = trip_count(rest, comps)
        unknown[0] += n is None
        n = 1 if n is None else n
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        per_iter = walk(body, mult * n)
        if per_iter:
          loops.append((n, per_iter))
        moved += n * per_iter
        continue
      called = _CALLS.findall(rest)
      b = _BRANCHES.search(rest)
      if b:
        called += [c.strip().lstrip("%") for c in b.group(1).split(",")]
      for c in called:
        if c in comps and not op.startswith(("reduce", "sort", "scatter", "map")):
          moved += walk(c, mult)
    return moved

  total = walk(entry, 1.0)
  return dict(total=total, by_kind=dict(by_kind), count=dict(count), loops=loops,
              unknown_trips=unknown[0])
