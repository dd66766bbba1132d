"""Starting the training loop: in this process now; multi-process and Ray Train launchers join here."""

from dlm.launcher.local import run_local

__all__ = ["run_local"]
