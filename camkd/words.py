"""Words in messages (imports nothing, so that every layer, the store's read side included, can use it)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 view', '2 views' (``many``: the plural when it is not word + 's', e.g. plural(n, "entry", "entries"))."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def human(n: float) -> str:
    """A size in the largest unit of 1024 that keeps it at least 1 (20 KB is '20.0 KB', never '0.0 MB')."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
