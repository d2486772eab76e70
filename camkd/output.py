"""What a command's result becomes besides its printed table: ``--out PREFIX`` -> PREFIX.json, PREFIX.md and
PREFIX.png (nothing is written without --out), and the figure the PNG is drawn on.

`camkd report` and the benchmarks share it: an output layer, below both, so a user command never imports the
benchmarks. It loads neither torch nor matplotlib until a figure is drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from camkd.errors import CamkdError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

SUFFIXES = (".json", ".md", ".png")  # what --out writes; one of them given on --out is taken off the prefix


def output_prefix(out: str | Path) -> Path:
    """The prefix of --out's three files (a given .json/.md/.png is taken off), checked before any work or output
    so that a bad --out is one error line, not a failure after a long run."""
    given = Path(out)
    prefix = given.with_suffix("") if given.suffix in SUFFIXES else given
    if given.is_dir():
        raise CamkdError(f"--out {given} is a folder; give a file name prefix such as {given / 'result'} "
                         f"(writes result.json, result.md and result.png there)")
    for path in files(prefix):
        if path.is_dir():
            raise CamkdError(f"--out {given} would write {path}, which is a folder; choose another prefix")
    existing = next(p for p in (prefix.absolute(), *prefix.absolute().parents) if p.exists())
    if existing != prefix.absolute() and not existing.is_dir():
        raise CamkdError(f"--out {given}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise CamkdError(f"--out {given}: cannot write in {existing}; choose a writable path")
    return prefix


def files(prefix: Path) -> list[Path]:
    """PREFIX.json, PREFIX.md, PREFIX.png (a dot in the prefix's name is kept: run.v2 -> run.v2.json)."""
    return [prefix.with_name(prefix.name + s) for s in SUFFIXES]


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure on the file-only Agg backend and its axes as a 2-D array (whatever the shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)


def write_result(data: dict, prefix: Path, markdown: str, fig: Figure) -> list[str]:
    """``data`` as PREFIX.json, ``markdown`` as PREFIX.md and ``fig`` as PREFIX.png (then closed); returns the paths."""
    import matplotlib.pyplot as plt

    js, md, png = files(Path(prefix))
    try:
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(data, indent=2))
        md.write_text(markdown + "\n")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    except OSError as e:
        raise CamkdError(f"cannot write --out {prefix}: {e.strerror or e}; choose a writable path") from None
    finally:
        plt.close(fig)
    return [str(js), str(md), str(png)]
