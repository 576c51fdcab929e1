"""Loading experiment config files by path (configs/ is not a package).

ml_collections' `config_flags` loads `--config=configs/X.py[:arg]` by path;
code that needs a config outside the CLI (a config building on another, a
test, a notebook) loads it the same way through here, instead of repeating
the importlib dance.
"""
import importlib.util
import os


def load_module(path: str):
  """The module of the Python file at `path`, freshly executed."""
  path = os.path.abspath(os.fspath(path))
  name = "instructrl_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(file: str, name: str):
  """The module `name` (e.g. "gpt3_shapes.py") next to the file `file`."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(file)), name))


def get_config(path: str, arg: str = ""):
  """`get_config(arg)` of the config file at `path`, as `--config=path:arg`."""
  return load_module(path).get_config(arg)
