"""Words in messages (imports nothing, so that every layer, the store's read side included, can use it)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 view', '2 views' (``many``: the plural when it is not word + 's', e.g. plural(n, "entry", "entries"))."""
    return f"{n} {word if n == 1 else many or word + 's'}"
