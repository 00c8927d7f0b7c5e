"""Exceptions that name a problem with the user's input or files (the CLI prints them as one line)."""


class ConfigMismatchError(ValueError):
  """The checkpoint was written by a run with a different config."""


class CheckpointError(RuntimeError):
  """No checkpoint of a run could be restored."""


# What the command line reports as "error: <message>" instead of a traceback.
USER_ERRORS = (FileNotFoundError, KeyError, TypeError, ValueError, CheckpointError)
