"""Small stateful parts that the checkpoint unit tests register with a ``CheckpointManager``."""

from __future__ import annotations


class Counter:
    """The smallest ``state_dict`` / ``load_state_dict`` part: one integer."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
