"""Placeholder until issue 3 lands."""
from typing import Any


class Streams:
    def __init__(self, storage: Any) -> None:
        self._storage = storage
