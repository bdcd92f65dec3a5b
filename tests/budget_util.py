"""What the budget test modules share: a fixed start time and a settable clock."""

from __future__ import annotations

from datetime import UTC, datetime

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC).timestamp()  # a Friday


class Clock:
    """A settable clock (Unix seconds)."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
