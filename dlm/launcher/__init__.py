"""Starting the training loop: in this process (``local``), as N processes on this machine
(``multiprocess``), or as a Ray Train job on a cluster (``ray``); :func:`launch` picks by ``launcher.kind``.

The exports are imported on first use (:mod:`dlm.lazy`), so that :mod:`dlm.config` can import this
package's section (:mod:`dlm.launcher.config`) without importing the launchers, which import it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlm.lazy import lazy_exports

if TYPE_CHECKING:
    from dlm.launcher.dispatch import launch, load_launch_config
    from dlm.launcher.local import run_local

__all__ = ["launch", "load_launch_config", "run_local"]
__getattr__ = lazy_exports(
    __name__, {"dlm.launcher.dispatch": ("launch", "load_launch_config"), "dlm.launcher.local": ("run_local",)}
)
