"""A stand-in for a KFP artifact, for calling the component bodies directly as a pod would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Art:
    """A KFP artifact's path, its metadata dict and log_metric."""

    path: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value
