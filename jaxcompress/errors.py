"""User-facing errors.

`UserError` marks a problem with the user's input (a file, an option, a config value). The CLI
prints its message without a traceback; every other exception is a bug and shows one.
"""


class UserError(Exception):
    """Bad input: the message names the file, tensor, layer or option and says what to do."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt, or does not match the model config."""


class ConfigError(UserError):
    """A config value or field is invalid or not implemented."""
