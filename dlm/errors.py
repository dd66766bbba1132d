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


class TrainingStopped(UserError):
    """A run stopped on request (SIGTERM or SIGINT) after saving a checkpoint at a step boundary.

    Not a failure: the message says where the checkpoint is and how to continue. The CLI exits with the
    shell's code for the signal (128 + its number), which schedulers read as "terminated", not "crashed".
    """

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.signum = signum
