"""Where records come from: a data spec string -> validated Python records.

Specs (plain strings, so configs stay ml_collections-friendly):

  "world"             the miniature instruction world (sft, rm, prompts)
  "corpus"            the stdlib pretraining corpus (lm)
  "jsonl:PATH"        JSONL file(s); PATH may be a glob and may contain
                      "{split}", replaced by the split name (jsonl.py has
                      the formats: TRL's prompt/completion, messages, text,
                      prompt/chosen/rejected, chosen/rejected, ranked K-way)
  "parquet:PATH"      Parquet file(s), the same fields (needs pyarrow)
  "text:PATH"         plain-text documents (lm), blank-line separated
  "tfds:NAME"         any TFDS dataset, NAME as TFDS spells it
                      ("name/config:version"), read through
                      seqio.TfdsDataSource from `tfds_data_dir`

Only the TFDS branch needs TensorFlow; it imports seqio when used.
"""
from typing import Any, Mapping, Optional

from instructrl.data import common
from instructrl.data import corpus
from instructrl.data import jsonl
from instructrl.data import world as world_lib

KINDS = ("lm", "sft", "rm", "prompts")

# Field names of each kind (TFDS features are renamed to these by `fields`).
FIELDS = {
    "lm": ("text",),
    "sft": ("prompt", "completion", "messages", "text"),
    "rm": ("prompt", "completions", "ranks", "group", "chosen", "rejected"),
    "prompts": ("prompt", "messages"),
}


def parse_spec(spec: str) -> tuple[str, str]:
  """'jsonl:/a/b' -> ('jsonl', '/a/b'); 'world' -> ('world', '')."""
  scheme, _, arg = spec.partition(":")
  if scheme in ("world", "corpus") and not arg:
    return scheme, ""
  if scheme in ("jsonl", "parquet", "text", "tfds") and arg:
    return scheme, arg
  raise common.DataError(
      "data", f"unknown data spec {spec!r}; use 'world', 'corpus', "
      "'jsonl:PATH', 'parquet:PATH', 'text:PATH' or 'tfds:NAME'")


def load_records(kind: str, spec: str, split: str, *,
                 world: Optional[Mapping[str, Any]] = None,
                 cache_dir: Optional[str] = None,
                 tfds_data_dir: Optional[str] = None,
                 fields: Optional[Mapping[str, str]] = None,
                 policy: Optional[common.ErrorPolicy] = None) -> list[Any]:
  """Validated records (common.Demo, Comparison, ...) of `kind` in `split`.

  Args:
    kind: "lm", "sft", "rm" or "prompts".
    spec: a data spec (module docstring).
    split: "train", "validation" or "test" (the corpus has no "test").
    world: WorldConfig fields for "world", e.g. {"seed": 1, "sft": 500}.
    cache_dir: cache for the corpus.
    tfds_data_dir: TFDS data dir for "tfds:" specs.
    fields: our field name -> TFDS feature name, for "tfds:" specs.
    policy: raise on bad records (default) or skip and count them.

  Returns:
    A list of records in the source's order.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  policy = policy or common.ErrorPolicy()
  scheme, arg = parse_spec(spec)
  if scheme == "world":
    if kind == "lm":
      raise common.DataError(spec, "the world has no pretraining text; use "
                             "'corpus' for lm data")
    return world_lib.get_world(
        world_lib.WorldConfig.from_dict(world)).records(kind, split)
  if scheme == "corpus":
    if kind != "lm":
      raise common.DataError(spec, f"the corpus only serves lm, not {kind}")
    return corpus.documents(split, cache_dir)
  if scheme == "text":
    if kind != "lm":
      raise common.DataError(spec, f"plain text only serves lm, not {kind}")
    return jsonl.read_text(arg.replace("{split}", split), policy)
  if scheme == "jsonl":
    return jsonl.read_jsonl(kind, arg.replace("{split}", split), policy)
  if scheme == "parquet":
    return jsonl.read_parquet(kind, arg.replace("{split}", split), policy)
  return read_tfds(kind, arg, split, data_dir=tfds_data_dir, fields=fields,
                   policy=policy)


def _to_python(value: Any, where: str, name: str) -> Any:
  """numpy/bytes values of a TFDS example -> str, int, lists of them."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise common.DataError(where, f'"{name}" is not valid UTF-8') from None
  if hasattr(value, "tolist"):
    return _to_python(value.tolist(), where, name)
  if isinstance(value, list):
    return [_to_python(v, where, name) for v in value]
  return value


def read_tfds(kind: str, name: str, split: str, *,
              data_dir: Optional[str] = None,
              fields: Optional[Mapping[str, str]] = None,
              policy: Optional[common.ErrorPolicy] = None) -> list[Any]:
  """Records from a TFDS dataset through `seqio.TfdsDataSource`.

  The dataset must already be prepared in `data_dir` (nothing is
  downloaded here). Features are renamed by `fields` (ours -> theirs) and
  then validated exactly like JSONL lines; locations read
  `tfds:NAME:SPLIT:INDEX`.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  policy = policy or common.ErrorPolicy()
  rename = {ours: (fields or {}).get(ours, ours) for ours in FIELDS[kind]}
  try:
    source = seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir)
    dataset = source.get_dataset(split=split, shuffle=False)
  except Exception as e:  # TFDS raises many types for a missing dataset.
    raise common.DataError(f"tfds:{name}", f"cannot read split {split!r} "
                           f"from {data_dir or 'the default data dir'} "
                           f"({type(e).__name__}: {e})".splitlines()[0]
                           ) from None
  parse = jsonl.PARSERS[kind]
  out = []
  for i, example in enumerate(dataset.as_numpy_iterator()):
    where = f"tfds:{name}:{split}:{i}"
    try:
      obj = {ours: _to_python(example[theirs], where, ours)
             for ours, theirs in rename.items() if theirs in example}
      out.append(parse(obj, where))
    except common.DataError as e:
      policy.handle(e)
  policy.report(f"tfds:{name}:{split}")
  return out
