"""Size first: print the planned store and the room for it, and refuse a store that cannot fit."""

from __future__ import annotations

import numpy as np

from camkd.errors import CamkdError
from camkd.store.config import CacheConfig
from camkd.store.location import Location
from camkd.store.plan import StorePlan, free_bytes
from camkd.store.sizes import human


def check_space(cfg: CacheConfig, path: Location, plan: StorePlan, done: np.ndarray | None, shapes: dict) -> list[str]:
    """The plan's lines and the free space against what is still to write (``done``: a continued store's progress
    flags, None for a new store); refuses when the local target cannot hold it (unless --no-space-check or
    --dry-run)."""
    need = plan.to_write(done)
    if not path.is_local:  # object storage reports no free space: nothing to refuse on
        return plan.lines() + [f"free space at {path}: not checked (object storage); still to write: {_about(plan)}"
                               f"{human(need)}"]
    where = path.local_path.absolute().parent
    free = free_bytes(path.local_path)
    if need > free and cfg.space_check and not cfg.dry_run:
        stored_views = 0 if done is None else done.shape[0]
        raise CamkdError(f"{path} needs {_about(plan)}{human(need)} more but {where} has {human(free)} free; free space, "
                         f"{_shrink(cfg, shapes, done is None, stored_views)}choose another --out, or add "
                         "--no-space-check if the estimate is wrong for this storage")
    return plan.lines() + [f"free at {where}: {human(free)}; still to write: {_about(plan)}{human(need)}"]


def _about(plan: StorePlan) -> str:
    return "about " if plan.compressed else ""


def _shrink(cfg: CacheConfig, shapes: dict, creating: bool, stored_views: int) -> str:
    """'cache A, B or C, ' naming only the options that would make this store smaller (none: '')."""
    ways = []
    if cfg.views > max(stored_views, 1):
        ways.append("fewer views (-V)")
    if creating and cfg.dtype == "float32":
        ways.append("float16 (--dtype)")
    if creating and shapes and cfg.stored_feature_dtype != "int8":
        ways.append("int8 features (--feature-dtype int8)")
    if creating and shapes:
        ways.append("fewer features (-f)")
    if not ways:
        return ""
    return "cache " + (", ".join(ways[:-1]) + " or " if len(ways) > 1 else "") + ways[-1] + ", "
