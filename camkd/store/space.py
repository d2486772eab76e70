"""Size first: print the planned store and the room for it, and refuse a store that cannot fit."""

from __future__ import annotations

from camkd.errors import CamkdError
from camkd.store import layout, topk
from camkd.store.config import CacheConfig
from camkd.store.location import Location
from camkd.store.plan import StorePlan, free_bytes, plan_store
from camkd.store.sizes import array_sizes, human


def check_space(cfg: CacheConfig, path: Location, creating: bool, *, n: int, k: int, num_classes: int, shapes: dict,
                block: int, logits: topk.LogitsSpec) -> list[str]:
    """The plan's lines and the free space (what still has to be written); refuses when the local target cannot
    hold it (unless --no-space-check or --dry-run). A continued store: its own views and blocks, minus what it holds."""
    stored, views, stored_views = 0, cfg.views, 0
    if not creating:
        g = path.open_group("r")
        attrs = g.attrs[layout.ATTRS_KEY]
        stored_views, block = attrs["views"], attrs["block_rows"]
        views = max(views, stored_views)
        stored = sum(array_sizes(g).values())
    plan = plan_store(n=n, views=views, k=k, num_classes=num_classes, dtype=cfg.dtype, shapes=shapes, block_rows=block,
                      feature_dtype=cfg.stored_feature_dtype, compressor=cfg.compressor, logits=logits)
    need = max(plan.total - stored, 0)
    if not path.is_local:  # object storage reports no free space: nothing to refuse on
        return plan.lines() + [f"free space at {path}: not checked (object storage); still to write: {human(need)}"]
    where = path.local_path.absolute().parent
    free = free_bytes(path.local_path)
    if need > free and cfg.space_check and not cfg.dry_run:
        raise CamkdError(f"{path} needs {human(need)}{_bound(plan)} more but {where} has {human(free)} free; free space, "
                         f"{_shrink(cfg, shapes, creating, stored_views)}choose another --out, or add --no-space-check if "
                         "the estimate is wrong for this storage")
    return plan.lines() + [f"free at {where}: {human(free)}; still to write: {human(need)}"]


def _bound(plan: StorePlan) -> str:
    return " (an upper bound: compression not counted)" if plan.compressed else ""


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
