"""Name -> factory tables, so the CLI's choices and error messages come from one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from pathseg.errors import PathsegError

T = TypeVar("T")


class Registry(Generic[T]):
    """Refuses duplicate names and lists the valid ones on a miss, so names never drift apart."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise PathsegError(f"unknown {self.kind} {name!r}; choose one of: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
