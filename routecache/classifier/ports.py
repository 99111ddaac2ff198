"""The difficulty classifier's port: P(the cheap model's answer is wrong) for a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from routecache.domain import OperatingPoint


@dataclass(frozen=True)
class Assessment:
    """One request's scores. failure_probability: calibrated P(the cheap model's answer is wrong).
    routing_score: what sending it strong is expected to gain, P(cheap fails) - P(strong fails);
    requests with routing_score >= threshold go to the strong model."""

    failure_probability: float
    routing_score: float


class DifficultyClassifier(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def default_threshold(self) -> float:
        """The routing threshold stored with the model, used when a tenant sets none."""
        ...

    @property
    def embedder(self) -> str | None:
        """The embedder whose vectors the model was trained on; None: any (test doubles)."""
        ...

    def threshold_for(self, point: OperatingPoint) -> float:
        """The threshold that meets an operator's target on this model's held-out curve."""
        ...

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float: ...

    def assess(self, embedding: npt.NDArray[np.float32], text: str) -> Assessment: ...
