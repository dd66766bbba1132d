"""The one user-facing error of the kernels: a backend that cannot run here, with what to do instead."""

from dlm.errors import ConfigError


class AttentionBackendError(ConfigError):
    """The chosen attention backend is not installed, cannot run on this device or dtype, or cannot take the
    requested mask. The message names the package to install or the backend to use instead."""
