"""The offline pretraining corpus: English text that ships with CPython.

Two sources, both present in every CPython install, so nothing is downloaded:
the help topics in `pydoc_data.topics` and the docstrings of the standard
library. Docstrings are read by parsing the .py files with `ast`; no module
is ever imported (some have side effects: `antigravity` opens a browser,
`this` prints, others touch the platform).

Cleaning keeps prose: it drops doctest and code-like paragraphs and joins
wrapped lines. Documents go to train or held-out by a hash of their text, so
the split is the same on every machine with the same Python version. The
held-out split ("validation") is what the alignment tax is measured on.

The result (~1.9 MB of text, ~3,500 documents) is cached as JSON in the
cache dir; building it takes about five seconds.
"""
import ast
import json
import os
import re
import sys
import sysconfig
import warnings
from typing import Iterator, Optional

from instructrl.data import common

SPLITS = ("train", "validation")
_VERSION = 1  # Bump when cleaning changes, to invalidate caches.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo",
              "site-packages", "dist-packages", "__pycache__", "ensurepip"}
_HELDOUT_BUCKETS = 1  # Out of 10: a tenth of the documents is held out.
_MIN_CHARS = 100
_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
  """Prose paragraphs of a docstring or help topic, one per line."""
  paragraphs = []
  for para in re.split(r"\n\s*\n", text):
    lines = [l.strip() for l in para.strip().splitlines()]
    if not lines or any(l.startswith((">>>", "...", "$ ", "%")) for l in lines):
      continue
    if any(l.startswith((".. ", "::")) for l in lines):
      continue  # reST directives.
    joined = _WS.sub(" ", " ".join(lines)).strip()
    letters = sum(c.isalpha() or c == " " for c in joined)
    if len(joined.split()) < 4 or letters < 0.8 * len(joined):
      continue  # Code, tables, signatures.
    paragraphs.append(joined)
  return "\n".join(paragraphs)


def _topic_texts() -> Iterator[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for name in sorted(topics.topics):
    yield topics.topics[name]


def _stdlib_files() -> Iterator[str]:
  root = sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def _docstrings(path: str) -> Iterator[str]:
  try:
    with open(path, "rb") as f:
      source = f.read()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Invalid escapes in old files.
      tree = ast.parse(source)
  except (SyntaxError, ValueError, OSError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        yield doc


def build() -> dict[str, list[str]]:
  """Extracts, cleans, dedups and splits the corpus (no cache)."""
  seen = set()
  out = {s: [] for s in SPLITS}
  texts = list(_topic_texts())
  for path in _stdlib_files():
    texts.extend(_docstrings(path))
  for raw in texts:
    text = _clean(raw)
    if len(text) < _MIN_CHARS or text in seen:
      continue
    seen.add(text)
    bucket = common.stable_hash("corpus", text) % 10
    out["validation" if bucket < _HELDOUT_BUCKETS else "train"].append(text)
  return out


def cache_path(cache_dir: Optional[str] = None) -> str:
  version = "%d.%d.%d" % sys.version_info[:3]
  return os.path.join(common.default_cache_dir(cache_dir),
                      f"corpus-py{version}-v{_VERSION}.json")


def load(cache_dir: Optional[str] = None) -> dict[str, list[str]]:
  """The corpus by split, from the cache or built (and cached) now."""
  path = cache_path(cache_dir)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  data = build()
  common.atomic_write(path, json.dumps(data).encode("utf-8"))
  return data


def documents(split: str, cache_dir: Optional[str] = None
              ) -> list[common.Document]:
  """The documents of `split` ("train" or "validation")."""
  if split not in SPLITS:
    raise ValueError(f"the corpus has splits {SPLITS}, got {split!r}")
  return [common.Document(t, f"corpus:{split}:{i}")
          for i, t in enumerate(load(cache_dir)[split])]


def sentences(cache_dir: Optional[str] = None) -> list[str]:
  """Training-split paragraphs, one per line: the vocabulary's input."""
  return [line for doc in load(cache_dir)["train"]
          for line in doc.split("\n") if line]
