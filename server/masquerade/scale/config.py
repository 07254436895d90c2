"""The scale-out settings (no Ray import: the CLI stays light); their flags live in masquerade.cli.serve."""

from __future__ import annotations

from dataclasses import dataclass

APP_NAME = "masquerade"
"""The Ray Serve application; its engine deployment is ``ENGINE_DEPLOYMENT``."""
ENGINE_DEPLOYMENT = "Engine"


@dataclass
class ScaleConfig:
    """How many engine replicas, where, and how Ray Serve routes and scales them."""

    replicas: int = 1
    """Replicas at start (the fixed count without autoscaling)."""
    address: str | None = None
    """None: start a local Ray cluster (stopped again on shutdown); "auto" or HOST:PORT: join one."""
    min_replicas: int | None = None
    """With ``max_replicas``: autoscaling bounds. None: a fixed ``replicas``."""
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    """Autoscaling target per replica; None: half the engine's max_batch (CFG pairs that fill one UNet call)."""
    max_queued_requests: int | None = None
    """Requests waiting for a replica with room before RESOURCE_EXHAUSTED; None: the engine's max_queue."""
    gpus_per_replica: float | None = None
    """None: 1 when the device is CUDA (or auto on a cluster with GPUs), else 0."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per replica (the front end and the Serve controller reserve none)."""

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def validated(self) -> ScaleConfig:
        if self.replicas < 1:
            raise ValueError(f"--ray-replicas must be at least 1, got {self.replicas}")
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            if not 0 <= low <= high or high < 1:
                raise ValueError(
                    f"--ray-min-replicas {low} / --ray-max-replicas {high}: need 0 <= min <= max and max >= 1"
                )
            if not low <= self.replicas <= high:
                raise ValueError(f"--ray-replicas {self.replicas} must lie within [{low}, {high}] when autoscaling")
            self.min_replicas, self.max_replicas = low, high
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError(f"--ray-target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.cpus_per_replica < 0 or (self.gpus_per_replica is not None and self.gpus_per_replica < 0):
            raise ValueError("--ray-cpus-per-replica and --ray-gpus-per-replica must be >= 0")
        return self
