"""User-facing errors: the CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, wrong tokenizer); never a bug in dlm."""


class ConfigError(UserError):
    """The run config is missing, malformed, or holds a key/value that is not allowed."""


class DataError(UserError):
    """Data files are missing, unreadable, or hold no usable text."""


class TokenizerError(UserError):
    """The tokenizer cannot be loaded or lacks a token the objective needs."""


class GenerationError(UserError):
    """A generation request cannot be served: a bad length spec or sampler setting, or a model without a head."""
