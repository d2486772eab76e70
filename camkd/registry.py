"""One registry shape for datasets, methods and models: a name -> entry table filled by a decorator.

Each kind has one :class:`Registry` in its package's base module, and the package's ``__init__``
imports every module that registers an entry, so importing the package (or any module in it)
fills the table; nothing imports lazily. ``create_x(name)`` functions look entries up with
:meth:`Registry.get`, whose error names the unknown entry and every known one.

A :class:`Prefix` stands for a whole family of names too many to list (``timm:NAME``): its own
``resolve`` checks the part after the prefix, so the family's package is imported only when one
of its names is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from camkd.errors import CamkdError

T = TypeVar("T")


@dataclass(frozen=True)
class Prefix(Generic[T]):
    """Every name ``PREFIX + REST``: ``resolve(REST)`` gives REST's spelling (or raises CamkdError), ``entry(REST)`` its entry."""

    resolve: Callable[[str], str]
    entry: Callable[[str], T]
    shown: str  # how listings show the family, e.g. "timm:NAME (any timm model)"


class Registry(Generic[T]):
    """Entries of one ``kind`` (as the error messages name it) by name; ``ignore_case``: look names up case-insensitively."""

    def __init__(self, kind: str, *, ignore_case: bool = False) -> None:
        self.kind, self.ignore_case = kind, ignore_case
        self._entries: dict[str, T] = {}
        self._prefixes: dict[str, Prefix[T]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated function or class under ``name``."""

        def deco(entry: T) -> T:
            self.add(name, entry)
            return entry

        return deco

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; a name taken already (case-insensitively, if so looked up) is a bug."""
        taken = {self._key(n) for n in self._entries}
        if self._key(name) in taken:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def add_prefix(self, prefix: str, family: Prefix[T]) -> None:
        """Register every name starting with ``prefix`` (matched as names are: case-insensitively if so looked up)."""
        self._prefixes[prefix] = family

    def families(self) -> list[str]:
        """How each prefix family is shown in listings (its names are too many to list)."""
        return [family.shown for family in self._prefixes.values()]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(self._key(n) == self._key(name) for n in self._entries)

    def resolve(self, name: str) -> str:
        """The registered spelling of ``name``; an unknown name is a one-line error listing the known ones."""
        if name in self._entries:
            return name
        for n in self._entries:
            if self._key(n) == self._key(name):
                return n
        for prefix, family in self._prefixes.items():
            if self._key(name).startswith(self._key(prefix)):
                return prefix + family.resolve(name[len(prefix) :])
        raise CamkdError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The entry registered as ``name`` (see :meth:`resolve`), or built by the prefix family ``name`` belongs to."""
        resolved = self.resolve(name)
        if resolved in self._entries:
            return self._entries[resolved]
        prefix = next(p for p in self._prefixes if resolved.startswith(p))
        return self._prefixes[prefix].entry(resolved[len(prefix) :])

    def _key(self, name: str) -> str:
        return name.lower() if self.ignore_case else name
