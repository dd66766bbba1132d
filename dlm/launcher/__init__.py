"""Starting the training loop: in this process (``local``), as N processes on this machine
(``multiprocess``), or as a Ray Train job on a cluster (``ray``); :func:`launch` picks by ``launcher.kind``."""

from dlm.launcher.launch import launch, load_launch_config
from dlm.launcher.local import run_local

__all__ = ["launch", "load_launch_config", "run_local"]
