"""Names, shapes, chunking and attrs of the store (documented in the README's store table).

The one place that names the store's arrays: every other module builds array paths with the
names and functions here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync  # zarr's own bridge to its async Store API

from camkd.data import rrc, views
from camkd.data.order import block_slice  # noqa: F401 - the store's blocks are the order's blocks
from camkd.errors import CamkdError

if TYPE_CHECKING:
    from camkd.store.location import Location
    from camkd.store.topk import LogitsSpec

FORMAT_VERSION = 1
ATTRS_KEY = "camkd"
CHUNK_TARGET_BYTES = 4 << 20  # chunks of at most ~4 MB along the sample axis
BLOCK_TARGET_BYTES = 32 << 20  # one writer unit (a shard) holds about this much across arrays
MAX_BLOCK_ROWS = 8192
MIN_BLOCK_ROWS = 64

DTYPES = {"float16": np.float16, "float32": np.float32}
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}  # int8: with a per-(sample, channel) scale
COMPRESSORS = ("none", "zstd")
ZSTD_LEVEL = 3
SCALE_SUFFIX = "_scale"
FEATURE_SCALE = "per sample and channel, max-abs / 127"
HEAD_DIMS = {0: (), 1: ("out",), 2: ("out", "in"), 4: ("out", "in", "kh", "kw")}


# -- array names ------------------------------------------------------------------------------------
LABELS = "labels"  # [N] int64
AUG = "aug"  # [V, N, 3] int16 (dx, dy, flip); image-folder stores: [V, N, 5] int32 (top, left, height, width, flip)
PIXELS = "pixels"  # image-folder stores: [V, N] uint32, CRC-32 of each uint8 view the teachers saw
FILES_GROUP = "files"  # image-folder stores: the file listing, [N] each: path (string), size (int64), label (int64)
FILES = ("path", "size", "label")
LOGITS = "logits"  # [V, N, K, C] (a dense store)
PROGRESS = "progress"  # [V, blocks] uint8, 1 = block durable
TOPK_GROUP = "topk"
TOPK = ("index", "values", "lse", "log_tail", "ce", "log_entropy")  # the arrays under topk/ (a top-k store)
TOPK_DIMS = {"index": ("teacher", "rank"), "values": ("teacher", "rank"), "lse": ("teacher", "temperature"),
             "log_tail": ("teacher", "temperature"), "ce": ("teacher",), "log_entropy": ("teacher",)}
FEATURES_GROUP = "features"
HEADS_GROUP = "heads"
VIEW_DIMS = ("view", "sample")  # the first two dimensions of every [V, N, ...] array
FEATURE_DIMS = VIEW_DIMS + ("channel", "height", "width")
SCALE_DIMS = VIEW_DIMS + ("channel",)


@dataclass(frozen=True)
class AugLayout:
    """How a store keeps its views' augmentation, by the recipe that made them."""

    params: tuple[str, ...]  # the columns of ``aug``
    dtype: type
    pixels: bool  # whether ``pixels`` (one CRC-32 per view) is kept


AUG_LAYOUTS = {
    views.RECIPE: AugLayout(("dx", "dy", "flip"), np.int16, pixels=False),
    rrc.RECIPE: AugLayout(rrc.PARAMS, np.int32, pixels=True),
}
CROP_AUG = AUG_LAYOUTS[views.RECIPE]  # the 32-px recipe's (padded crop and flip)


def aug_layout(augmentation: dict) -> AugLayout:
    """The layout of a store's ``aug`` (and ``pixels``) for its recorded augmentation."""
    recipe = augmentation.get("recipe")
    if recipe not in AUG_LAYOUTS:
        raise CamkdError(f"the store's augmentation recipe '{recipe}' is not one this camkd replays; re-cache")
    return AUG_LAYOUTS[recipe]


def files_path(name: str) -> str:
    """The path of one array of the file listing (a name of FILES)."""
    return f"{FILES_GROUP}/{name}"


def topk_path(name: str) -> str:
    """The path of one top-k array (a name of TOPK)."""
    return f"{TOPK_GROUP}/{name}"


def logit_arrays(spec: LogitsSpec) -> list[str]:
    """The arrays that hold a store's logits: ``logits``, or the ``topk/`` arrays."""
    return [LOGITS] if spec.kind == "dense" else [topk_path(name) for name in TOPK]


def staged_prefixes(layers: tuple[str, ...]) -> tuple[str, ...]:
    """Path prefixes of the [V, N, ...] arrays a reader of ``layers`` needs: aug, the logits, those layers' features."""
    return (AUG, PIXELS, LOGITS, f"{TOPK_GROUP}/") + tuple(f"{FEATURES_GROUP}/{layer}/" for layer in layers)


def describe_arrays(spec: LogitsSpec, int8: bool, aug: AugLayout = AUG_LAYOUTS[views.RECIPE]) -> dict[str, str]:
    """The attrs' ``arrays``: what each array holds, in words (for a reader with plain zarr)."""
    out = {LABELS: "[N] int64", AUG: "[V, N, 3] int16 (dx, dy, flip)", LOGITS: "[V, N, K, C]",
           f"{FEATURES_GROUP}/<layer>/t<k>": "[V, N, c, h, w] per teacher",
           f"{HEADS_GROUP}/t<k>/<param>": "teacher k's classifier head", PROGRESS: "[V, blocks] uint8, 1 = block durable"}
    if spec.kind == "topk":
        del out[LOGITS]
        out.update({
            topk_path("index"): f"[V, N, K, {spec.k}] class of each kept logit, largest first",
            topk_path("values"): f"[V, N, K, {spec.k}] the kept logits",
            topk_path("lse"): "[V, N, K, len(kd_T)] float32 logsumexp(z / T) per cached T",
            topk_path("log_tail"): "[V, N, K, len(kd_T)] float32 log of the mass at T outside the kept classes",
            topk_path("ce"): "[V, N, K] float32 cross-entropy against the label at T = 1",
            topk_path("log_entropy"): "[V, N, K] float32 log entropy at T = 1"})
    if aug.pixels:
        out[AUG] = f"[V, N, {len(aug.params)}] {np.dtype(aug.dtype).name} ({', '.join(aug.params)})"
        out[PIXELS] = "[V, N] uint32 CRC-32 (zlib) of each uint8 view [3, S, S] the teachers saw"
        out[FILES_GROUP + "/path|size|label"] = "[N] each: file path relative to the data folder, byte size, label"
    if int8:
        out[f"{FEATURES_GROUP}/<layer>/t<k>"] = "[V, N, c, h, w] int8 per teacher; feature = q * scale"
        out[f"{FEATURES_GROUP}/<layer>/t<k>{SCALE_SUFFIX}"] = "[V, N, c] float32 per teacher"
    return out


# -- the format --------------------------------------------------------------------------------------
REQUIRED_ATTRS = ("format_version", "camkd_version", "dataset", "augmentation", "teachers", "dtype", "feature_dtype",
                  "compressor", "logits", "features", "views", "block_rows")
REQUIRED_TEACHER_ATTRS = ("arch", "checkpoint", "path", "sha256", "num_classes")


def check_format(attrs: dict, where: str) -> None:
    """Refuse a camkd store of another format, or one written by an earlier pre-release camkd (attrs missing)."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if not missing and isinstance(attrs["teachers"], list):
        missing = sorted({k for t in attrs["teachers"] for k in REQUIRED_TEACHER_ATTRS if k not in t})
    if attrs.get("format_version") == FORMAT_VERSION and not missing:
        return
    what = f"store format {attrs.get('format_version')}" if attrs.get("format_version") != FORMAT_VERSION \
        else f"a pre-release layout (no {', '.join(missing)} recorded)"
    raise CamkdError(f"{where} was written by an earlier camkd ({what}); this camkd reads format {FORMAT_VERSION} only: "
                     f"rebuild it with 'camkd cache-teachers ... --out {where} --overwrite'")


def open_camkd_group(loc: Location, mode: str, where: str, *, unreadable: str, not_camkd: str) -> zarr.Group:
    """The Zarr group of the camkd store at ``loc`` (``where`` in messages), its format checked (:func:`check_format`):
    the one opening of an existing store, for reading it (reader.open_store) and for continuing it (identity).
    ``unreadable``: the whole refusal when no Zarr group can be read there; ``not_camkd``: the fix named when the
    group is not a camkd store (the reader's and the writer's differ)."""
    try:
        g = loc.open_group(mode)
        attrs = g.attrs.get(ATTRS_KEY)
    except CamkdError:
        raise
    except Exception:
        raise CamkdError(unreadable) from None
    if not isinstance(attrs, dict) or "format_version" not in attrs:
        raise CamkdError(f"{where} is a Zarr group but not a camkd store; {not_camkd}")
    check_format(attrs, where)
    return g


FEATURE_LAYERS_HELP = "none, penultimate or hint:L (L = index into the model's feature list)"


def parse_layer(text: str) -> tuple[str, int] | None:
    """'penultimate' -> ('penultimate', -2); 'hint:L' -> ('hintL', L); 'none' -> None."""
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "penultimate":
        return "penultimate", -2
    if text.startswith("hint"):
        num = text[4:].lstrip(":")
        num = num or "2"
        if num.lstrip("-").isdigit():
            return f"hint{int(num)}", int(num)
    raise CamkdError(f"unknown feature layer '{text}'; use {FEATURE_LAYERS_HELP}")


def layer_option(layer: str) -> str:
    """The --features value that stores ``layer`` (the inverse of parse_layer)."""
    return "penultimate" if layer == "penultimate" else f"hint:{layer[4:]}"


def teacher_key(k: int) -> str:
    return f"t{k}"


def feature_path(layer: str, k: int) -> str:
    return f"{FEATURES_GROUP}/{layer}/{teacher_key(k)}"


def scale_path(layer: str, k: int) -> str:
    """The float32 [V, N, c] scale array beside an int8 feature array (feature = q * scale)."""
    return feature_path(layer, k) + SCALE_SUFFIX


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[rows, c, h, w] floats -> (int8 q, float32 scale [rows, c]): scale = max|x| over (h, w) / 127 (0 -> 1),
    q = round(x / scale) clipped to [-127, 127]."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=(2, 3)) / np.float32(127)
    scale[scale == 0] = 1
    q = np.clip(np.rint(x / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 q [..., c, h, w] and scale [..., c] -> float32 q * scale."""
    return q.astype(np.float32) * scale[..., None, None]


def head_path(k: int, key: str) -> str:
    return f"{HEADS_GROUP}/{teacher_key(k)}/{key}"


def plan_block_rows(bytes_per_row: int, batch_size: int, n: int) -> int:
    """Rows per writer unit: a power of two in [64, 8192] near BLOCK_TARGET_BYTES, at least one batch,
    and no larger than needed to hold all ``n`` rows (a partial chunk is stored whole)."""
    rows = MIN_BLOCK_ROWS
    while rows * 2 <= MAX_BLOCK_ROWS and rows * 2 * bytes_per_row <= BLOCK_TARGET_BYTES:
        rows *= 2
    while rows < batch_size and rows < MAX_BLOCK_ROWS:
        rows *= 2
    while rows > MIN_BLOCK_ROWS and rows // 2 >= n:
        rows //= 2
    return rows


def plan_chunk_rows(bytes_per_row: int, block_rows: int) -> int:
    """Rows per chunk: the largest power-of-two divisor of block_rows with chunks <= CHUNK_TARGET_BYTES."""
    rows = block_rows
    while rows > 1 and rows * bytes_per_row > CHUNK_TARGET_BYTES:
        rows //= 2
    return rows


def num_blocks(n: int, block_rows: int) -> int:
    return (n + block_rows - 1) // block_rows


# -- stored objects (chunks, or shards where an array is sharded) -----------------------------------
# Each view x sample array stores one object per (view, row block): a shard when its chunks are
# smaller than a block, else one chunk of exactly a block.

def object_rows(arr: zarr.Array) -> int:
    """Rows along the sample axis held by one stored object (a shard, or a chunk if unsharded)."""
    return (arr.shards or arr.chunks)[1]


def block_object_keys(arr: zarr.Array, view: int, rows: slice) -> list[str]:
    """Store keys of the objects that hold ``rows`` of ``view``, from the array's own chunk key encoding."""
    step = object_rows(arr)
    tail = (0,) * (arr.ndim - 2)
    return [object_key(arr, (view, c) + tail) for c in range(rows.start // step, (rows.stop - 1) // step + 1)]


def object_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of the object at ``coords`` of the array's shard grid (its chunk grid if unsharded)."""
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.store_path.path}/{key}" if arr.store_path.path else key


def object_size(arr: zarr.Array, key: str) -> int | None:
    """Bytes of a stored object, None if it does not exist (zarr would read it as fill values)."""
    try:
        return int(sync(arr.store.getsize(key)))
    except FileNotFoundError:
        return None


def delete_object(arr: zarr.Array, key: str) -> None:
    sync(arr.store.delete(key))


def read_failure(e: BaseException) -> str:
    """What is known about a chunk that zarr could not read, in words (no exception class names, no bytes)."""
    if isinstance(e, OSError):
        return f"cannot be read from disk ({e.strerror or 'I/O error'})"
    if "checksum" in str(e).lower():
        return "fails its checksum"
    return "cannot be decoded"
