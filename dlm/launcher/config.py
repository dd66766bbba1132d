"""The ``launcher`` section: how many training processes start, and where (this process, this machine, a Ray
cluster)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from dlm.sections import CrossFieldError, Section


class LauncherSection(Section):
    """How workers are started: ``local`` runs the loop in this process, ``multiprocess`` starts ``workers``
    processes on this machine, ``ray`` runs them as a Ray Train ``TorchTrainer`` on a Ray cluster (restarting
    the whole group from the last checkpoint after a failure, up to ``max_failures`` times)."""

    kind: Literal["local", "multiprocess", "ray"] = "local"
    workers: int = Field(1, gt=0, description="training processes = data-parallel world size")
    ray_address: Optional[str] = Field(None, description="auto | local (start one here) | HOST:PORT | ray://HOST:PORT")
    use_gpu: Optional[bool] = Field(None, description="one GPU per worker; default: when run.device is not cpu")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources of one worker; default {CPU: 1} (+ {GPU: 1} with use_gpu)"
    )
    max_failures: int = Field(0, ge=-1, description="Ray: group restarts after a worker failure; -1 = unlimited")
    storage_path: Optional[str] = Field(None, description="Ray: where checkpoints are copied; default run.dir/ray")
    check_resources: bool = Field(True, description="Ray: refuse to start when the cluster cannot place all workers")

    @model_validator(mode="after")
    def _kind_fields(self) -> LauncherSection:
        if self.kind == "local" and self.workers != 1:
            raise CrossFieldError(
                "launcher.workers", self.workers, "needs launcher.kind=multiprocess or ray (local runs one process)"
            )
        if self.kind != "ray":
            for key, default in (("ray_address", None), ("storage_path", None), ("max_failures", 0)):
                if getattr(self, key) != default:
                    raise CrossFieldError(f"launcher.{key}", getattr(self, key), "applies only to launcher.kind=ray")
        return self

    def worker_resources(self, use_gpu: bool) -> dict[str, float]:
        """What Ray reserves for each worker."""
        if self.resources_per_worker:
            return dict(self.resources_per_worker)
        return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


__all__ = ["LauncherSection"]
