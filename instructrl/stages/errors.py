"""The user-mistake exception of the stages (its own module so that every
stage module, `validate` included, can raise it without an import cycle)."""


class ConfigError(ValueError):
  """A user mistake in the config: main prints one line and exits with 2."""
