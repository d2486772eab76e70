"""Which store a run continues: its identity, the target's state, and opening or creating it.

A store is continued only by a run of the same identity (data, augmentation, teachers' weights and
precision, dtypes, compressor, logits, features); any difference is refused, naming it. check_target decides
what a run will do with its --out before anything is printed or written; open_or_create does it.
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import replace
from enum import Enum

import numpy as np
import zarr

import camkd.store.layout as layout
import camkd.store.schema as schema
import camkd.store.topk as topk
from camkd.data import DataSplit
from camkd.data.augspec import AugSpec
from camkd.errors import CamkdError
from camkd.progress import log
from camkd.store.config import CacheConfig
from camkd.store.description import (
    DataIdentity,
    FolderFields,
    LayerSpec,
    StoreDescription,
    TeacherRecord,
    read_description,
    tf32_of,
    write_description,
)
from camkd.store.differences import differences
from camkd.store.location import Location, parse_location
from camkd.store.runner import TeacherRunner

# recorded in the store, not compared: the layout changes kernels, not the math; a folder store's whole-folder flag
# follows from --limit and the folder, both compared through the dataset's fingerprint
# (the teachers' TF32, like the device, is not part of the identity at all: recorded beside, for cache-verify's tolerance)
RECORDED_ONLY = ("teacher_channels_last", "folder_whole")
_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # zarr's temporary file of a write that a kill interrupted


class Target(Enum):
    CREATE = "create"  # nothing there: create the store
    RECREATE = "recreate"  # a store to delete first (--overwrite, or a remote creation that was interrupted)
    CONTINUE = "continue"  # a store of the same identity: fill its missing blocks, extend its views


def identity(cfg: CacheConfig, teachers: TeacherRunner, train: DataSplit, spec: AugSpec, layers: dict, shapes: dict,
             logits: topk.LogitsSpec) -> StoreDescription:
    """What this run makes: the description of its store before it is written (no views, block rows or accuracy yet).
    Its :meth:`~StoreDescription.identity` must match for a store to be continued (not the number of views, not
    checkpoint paths); :data:`RECORDED_ONLY` of it is recorded beside (the teachers' memory format, free to change
    like the device)."""
    return StoreDescription(
        dataset=DataIdentity(name=train.name, split=train.split, n=len(train), fingerprint=train.fingerprint,
                             num_classes=train.num_classes, in_channels=train.in_channels, image_size=train.image_size),
        augmentation=spec.to_dict(),
        teachers=tuple(TeacherRecord.from_attrs(t) for t in teachers.provenance),
        teacher_precision=cfg.precision,  # autocast of the teachers' forward: other numbers, so part of the identity
        teacher_channels_last=cfg.channels_last,
        teacher_tf32=tf32_of(teachers.device),  # float32 in TF32 (CUDA's cuDNN default): cache-verify's tolerance
        dtype=cfg.dtype, feature_dtype=cfg.stored_feature_dtype, compressor=cfg.compressor, logits=logits,
        features={name: LayerSpec(idx, tuple(tuple(s) for s in shapes[name])) for name, idx in layers.items()},
        folder=FolderFields.from_attrs(train.store_attrs()),  # image folders: data kind, decoder and versions, classes
        reopen=train.reopen.to_dict() if train.reopen is not None else None,  # recorded beside, not compared
    )


def check_target(path: Location, made: StoreDescription, cfg: CacheConfig) -> Target:
    """What this run will do with ``path``, refusing (before any output) a target it must not touch or continue."""
    if not path.exists():
        return Target.CREATE
    if cfg.overwrite or _half_created(path):
        if path.is_local:
            local = path.local_path
            if not local.is_dir() or (not (local / "zarr.json").exists() and any(local.iterdir())):
                raise CamkdError(f"{path} exists and is not a Zarr store; refusing to delete it even with --overwrite")
        elif not path.is_zarr():
            raise CamkdError(f"{path} holds objects but no Zarr store; refusing to delete them even with --overwrite")
        return Target.RECREATE
    stored = read_description(_open_existing(path, "r"))
    compared = {k: v for k, v in made.identity().items() if k not in RECORDED_ONLY}
    old_identity = stored.identity()
    old = {k: old_identity.get(k) for k in compared}
    whole = stored.folder.whole and made.folder.whole  # both without --limit
    diff = differences(old, compared, whole_folders=whole)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise CamkdError(f"{path} was made differently: {'; '.join(diff[:3])}{more}; use --overwrite to replace it or "
                         "another --out")
    return Target.CONTINUE


def _half_created(loc: Location) -> bool:
    """A remote store whose creation was interrupted (its attrs still the CREATING mark): to be created anew."""
    if loc.is_local or not loc.is_zarr():
        return False
    try:
        attrs = dict(loc.open_group("r").attrs)
    except Exception:  # noqa: BLE001 - not a readable group: _open_existing says what is wrong
        return False
    return attrs.get(schema.CREATING) is True and layout.ATTRS_KEY not in attrs


def _open_existing(path: Location, mode: str) -> zarr.Group:
    hint = " or add --overwrite" if path.is_zarr() else ""  # --overwrite deletes only Zarr stores
    return layout.open_camkd_group(path, mode, str(path), unreadable=f"{path} exists and is not a camkd store; choose "
                                   f"another --out{hint}", not_camkd="choose another --out or add --overwrite")


def open_or_create(path: Location, target: Target, made: StoreDescription, cfg: CacheConfig, teachers: TeacherRunner,
                   samples: dict[str, np.ndarray], shapes: dict, test_acc: list[float] | None, block: int) -> None:
    """Do what check_target decided: delete and create, create, or open (removing temporary files, adding views)."""
    if target is Target.RECREATE:
        if not cfg.overwrite:
            log(f"{path}: its creation was interrupted; creating it anew")
        path.delete()
    if target is Target.CONTINUE:
        _continue(path, cfg, made)
    elif not path.is_local:
        # no rename on object storage: metadata written in place, marked CREATING until the attrs are written
        # (a rerun after a kill creates it anew); the progress flags make the filling resumable as on disk
        try:
            schema.create(path, made, cfg, teachers, samples, shapes, test_acc, block)
        except OSError as e:
            raise CamkdError(f"cannot create {path}: {e.strerror or e}; rerun the same command") from None
    else:
        _create_local(path, made, cfg, teachers, samples, shapes, test_acc, block)


def _continue(path: Location, cfg: CacheConfig, made: StoreDescription) -> None:
    g = _open_existing(path, "r+")
    stored = read_description(g)
    remove_partial_files(path)
    tf32 = {op: stored.tf32_ops[op] or made.tf32_ops[op] for op in stored.tf32_ops}
    if tf32 != stored.tf32_ops:  # this run adds blocks computed in TF32: the store says so (cache-verify's tolerance)
        stored = replace(stored, teacher_tf32=tf32)
        write_description(g, stored)
    if cfg.views > stored.views:
        log(f"extending {path} from {stored.views} to {cfg.views} views")
        schema.append_views(g, stored, cfg.views)


def remove_partial_files(path: Location) -> None:
    """Delete the temporary files of writes a kill interrupted (object stores have none: a PUT is whole or absent)."""
    if path.is_local:
        for f in path.local_path.rglob("*.partial"):
            if _PARTIAL.fullmatch(f.name):
                f.unlink(missing_ok=True)


def _create_local(path: Location, made: StoreDescription, cfg: CacheConfig, teachers: TeacherRunner,
                  samples: dict[str, np.ndarray], shapes: dict, test_acc: list[float] | None, block: int) -> None:
    """Built under a temporary name and renamed when whole: a run killed while creating leaves no half store."""
    local = path.local_path
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CamkdError(f"cannot create {local.parent}: {e.strerror}") from None
    tmp = local.with_name(f".{local.name}.camkd-creating")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        schema.create(parse_location(tmp), made, cfg, teachers, samples, shapes, test_acc, block)
        tmp.rename(local)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CamkdError(f"cannot create {path}: {what}") from None
