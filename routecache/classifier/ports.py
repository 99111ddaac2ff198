"""The difficulty classifier's port: P(the cheap model's answer is wrong) for a request."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt


class DifficultyClassifier(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def default_threshold(self) -> float:
        """The routing threshold stored with the model, used when a tenant sets none."""
        ...

    def failure_probability(self, embedding: npt.NDArray[np.float32], text: str) -> float: ...
