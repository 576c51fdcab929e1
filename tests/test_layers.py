"""The package's shape: imports flow one way, no cycles, no private names.

Layers, lowest first (docs/design.md, "Layout"):
  core    instructrl.{mesh,losses,loss_checks,sampling,steps,checkpoint,
          state_format,metrics,config_files}, instructrl.model
  data    instructrl.data (beside the core: neither imports the other)
  hf      instructrl.hf (Hugging Face checkpoints: the core and data below it)
  rl      instructrl.rl
  eval    instructrl.eval
  stages  instructrl.stages
  tools   instructrl.tools
  main    instructrl.main
A module may import its own layer or a lower one. Every import counts,
also one inside a function (an import hidden there to dodge a cycle is
still a cycle). Read from the source with `ast`, so nothing is imported.
"""
from __future__ import annotations

import ast
import os
import pathlib
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "instructrl"
RANK = {"core": 0, "data": 0, "hf": 1, "rl": 2, "eval": 3, "stages": 4, "tools": 5,
        "main": 6}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> str:
  parts = mod.split(".")
  if len(parts) == 1:
    return "core"
  if parts[1] in ("data", "hf", "rl", "eval", "stages", "tools", "main"):
    return parts[1]
  return "core"


def imports(path: pathlib.Path, known: dict) -> list[tuple[str, int, str | None]]:
  """(target module, line, imported name) for every instructrl import."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, None) for a in node.names
              if a.name.split(".")[0] == "instructrl"]
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split(".")[0] == "instructrl"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.append((sub, node.lineno, None) if sub in known
                   else (node.module, node.lineno, a.name))
  return out


def graph() -> dict[str, set[str]]:
  known = modules()
  return {m: {t for t, _, _ in imports(p, known)} for m, p in known.items()}


def test_every_import_names_a_module_that_exists():
  known = modules()
  missing = [(m, line, t) for m, p in known.items() for t, line, _ in imports(p, known)
             if t not in known]
  assert not missing


def test_imports_flow_down_the_layers():
  bad = []
  for mod, targets in graph().items():
    for t in targets:
      a, b = layer(mod), layer(t)
      crosses_data = {a, b} == {"core", "data"}  # Neither imports the other.
      if RANK[b] > RANK[a] or crosses_data:
        bad.append(f"{mod} ({a}) imports {t} ({b})")
  assert not bad, "\n".join(bad)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = n[0]
    n[0] += 1
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in g.get(v, ()):
        out.append(sorted(comp))
  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert not _cycles(graph())


def test_the_cycle_finder_finds_a_cycle():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(g) == [["a", "b", "c"]]
  assert not _cycles({"a": {"b"}, "b": set()})


def test_no_private_name_is_imported_or_used_across_modules():
  known, bad = modules(), []
  for mod, path in known.items():
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}
    for t, line, name in imports(path, known):
      if name and name.startswith("_"):
        bad.append(f"{mod}:{line} imports {t}.{name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith("instructrl")):
        for a in node.names:
          if f"{node.module}.{a.name}" in known:
            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)


def test_no_two_modules_share_a_name():
  names = [p.stem for p in PKG.rglob("*.py") if p.stem != "__init__"]
  names += [p.parent.name for p in PKG.rglob("__init__.py") if p.parent != PKG]
  assert [n for n, c in Counter(names).items() if c > 1] == []


def test_each_stage_module_has_build_and_run():
  for name in ("lm", "rm", "ppo", "evaluate"):
    tree = ast.parse((PKG / "stages" / f"{name}.py").read_text())
    defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"build", "run"} <= defs, name


def test_the_core_and_losses_import_without_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; import instructrl.losses, instructrl.model, instructrl.sampling, "
          "instructrl.steps, instructrl.rl.learner, instructrl.rl.rollout; "
          "print(any(m in sys.modules for m in ('tensorflow', 'seqio')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, check=True, env={"JAX_PLATFORMS": "cpu",
                                                   "PATH": "/usr/bin:/bin"})
  assert out.stdout.strip() == "False"


def test_the_tiny_pipelines_data_path_imports_no_tensorflow():
  """Vocabularies are our own (SentencePiece, bytes, `tokenizers`): reading,
  tokenizing and batching every stage's data of default.py:tiny, and the
  sampler's special ids, start neither TensorFlow nor seqio."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (
      "import sys; import instructrl.main, instructrl.stages.runner\n"
      "from instructrl import config_files\n"
      "from instructrl.stages import inputs\n"
      "c = config_files.get_config('configs/default.py', 'tiny')\n"
      "for kind, sc, n in (('sft', c.sft, c.sft.seq_len), ('rm', c.rm, c.rm.seq_len),\n"
      "                    ('prompts', c.ppo, c.ppo.prompt_len),\n"
      "                    ('lm', c.pretrain, c.pretrain.seq_len)):\n"
      "  next(inputs.iterator(c, kind, sc.data, 'train', 4, n, 0))\n"
      "from instructrl.sampling import SampleConfig\n"
      "assert SampleConfig(**inputs.special_ids(c)).eos_ids == (1,)  # The byte vocab's.\n"
      "print(any(m in sys.modules for m in ('tensorflow', 'seqio')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                       **{k: v for k, v in os.environ.items()
                                          if k in ("HOME", "INSTRUCTRL_CACHE")}})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "False"
