"""A clock the test moves by hand, for the sans-IO connections' ``clock=`` argument."""

from __future__ import annotations


class ManualClock:
    """Returns ``now`` until the test changes it, so timers fire exactly when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
