"""A store's metadata, typed: parsed once when a store is opened, written once when it is made.

The attrs under ``camkd`` in the group's zarr.json are the store's description for plain zarr readers; camkd
reads and writes them only through :class:`StoreDescription`. ``to_attrs`` writes the keys in the order the
format has always had and leaves out what a store does not record (no test accuracy after --no-eval, no folder
fields for in-memory data), so a description parsed from a store writes back the same bytes. Fields added to
the format later are optional here and get their old meaning when absent (a store from before
``teacher_precision`` ran its teachers in fp32, one before ``folder_whole`` is not known to hold a whole folder, one
before ``teacher_tf32`` ran them without TF32, as a CPU does).
Keys this camkd does not know are kept as they are (``extra``). A field the format gains later is added here
the same way: optional, with a property that gives a store without it its old meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import zarr

import camkd.store.layout as layout
from camkd.data import Normalization, SplitOptions
from camkd.data.augspec import AugSpec
from camkd.store.topk import LogitsSpec


def read_description(g: zarr.Group) -> StoreDescription:
    """The description of an opened camkd store (its format checked already: layout.check_format)."""
    return StoreDescription.from_attrs(g.attrs[layout.ATTRS_KEY])


def write_description(g: zarr.Group, d: StoreDescription) -> None:
    """Replace a store's attrs with ``d``'s (one write)."""
    g.attrs[layout.ATTRS_KEY] = d.to_attrs()


PRECISION_BEFORE = "fp32"  # the teachers' precision of a store made before it was recorded
IDENTITY_TEACHER_KEYS = ("arch", "sha256", "num_classes", "class_rows")  # not the path: the same weights from anywhere continue a store
FOLDER_KEYS = ("data_kind", "decoder", "decoder_versions", "classes", "folder_whole")  # image-folder stores only
_DATA_KEYS = ("name", "split", "n", "fingerprint", "num_classes", "in_channels", "image_size")
_TEACHER_KEYS = ("arch", "checkpoint", "path", "sha256", "num_classes", "test_accuracy", "weights", "published_accuracy",
                 "class_rows")


TF32_OPS = ("conv", "matmul")  # float32 ops CUDA can run in TF32: cuDNN convolutions, cuBLAS matmuls


def tf32_of(device: torch.device | str) -> dict[str, bool]:
    """Whether float32 convolutions and matmuls on ``device`` run in TF32 (10 mantissa bits) under torch's settings
    now: on CUDA ``torch.backends.cudnn.allow_tf32`` (on by default) and ``torch.backends.cuda.matmul.allow_tf32``
    (off by default), or their fp32_precision form; on any other device never (what a store records as
    ``teacher_tf32``, and what cache-verify's tolerance asks of the verifying machine)."""
    if torch.device(device).type != "cuda":
        return dict.fromkeys(TF32_OPS, False)
    cudnn, cuda, backends = torch.backends.cudnn, torch.backends.cuda, torch.backends
    # each op's fp32_precision, then its backend's (cuDNN's stands for all of CUDA's), then the global one
    return {"conv": _tf32(lambda: cudnn.allow_tf32, (lambda: cudnn.conv.fp32_precision, lambda: cudnn.fp32_precision,
                                                     lambda: backends.fp32_precision)),
            "matmul": _tf32(lambda: cuda.matmul.allow_tf32, (lambda: cuda.matmul.fp32_precision,
                                                             lambda: cudnn.fp32_precision, lambda: backends.fp32_precision))}


def _tf32(legacy, levels) -> bool:
    """torch's own answer (allow_tf32), or, where it refuses because the settings mix the legacy and the fp32_precision
    API (a RuntimeError), the first of ``levels`` (fp32_precision getters, the op's first) that is set ("none": ask the
    next), as torch resolves it."""
    try:
        return bool(legacy())
    except RuntimeError:
        pass
    for level in levels:
        value = level()
        if value != "none":
            return value == "tf32"
    return False


def _present(pairs) -> dict:
    """The pairs whose value is recorded (None: the store does not record it)."""
    return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class DataIdentity:
    """Which training samples a store holds: the split, how many, their fingerprint, and their shape."""

    name: str
    split: str
    n: int
    fingerprint: str
    num_classes: int
    in_channels: int | None = None  # None: not recorded (a store older than the field)
    image_size: int | None = None

    @staticmethod
    def from_attrs(d: dict) -> DataIdentity:
        return DataIdentity(**{k: d.get(k) for k in _DATA_KEYS})

    def to_attrs(self) -> dict:
        return _present((k, getattr(self, k)) for k in _DATA_KEYS)


@dataclass(frozen=True)
class FolderFields:
    """What an image-folder store records beside its samples: the decoder, its versions, the classes, whether
    it holds every file of the folder (``whole``: stored as ``folder_whole``, absent in stores older than it)."""

    data_kind: str | None = None
    decoder: str | None = None
    decoder_versions: dict | None = None
    classes: list[str] | None = None
    folder_whole: bool | None = None

    @staticmethod
    def from_attrs(d: dict) -> FolderFields:
        return FolderFields(**{k: d.get(k) for k in FOLDER_KEYS})

    def to_attrs(self) -> dict:
        return _present((k, getattr(self, k)) for k in FOLDER_KEYS)

    @property
    def whole(self) -> bool:
        return bool(self.folder_whole)


@dataclass(frozen=True)
class TeacherRecord:
    """One teacher as a store records it: its weights' identity and where they came from when the store was made."""

    arch: str
    checkpoint: str
    path: str
    sha256: str
    num_classes: int
    test_accuracy: float | None = None  # None: created with --no-eval
    weights: str | None = None  # named published weights (e.g. 'ResNet50_Weights.IMAGENET1K_V2'); None: a file, or an older store
    published_accuracy: float | None = None  # the top-1 the weights' library reports for them (None: none published)
    class_rows: list[int] | None = None  # an ImageNet-1k teacher on an ImageNet subset: the rows kept (classmap.py)
    extra: dict = field(default_factory=dict)  # keys this camkd does not know, kept as they are

    @staticmethod
    def from_attrs(d: dict) -> TeacherRecord:
        return TeacherRecord(**{k: d.get(k) for k in _TEACHER_KEYS}, extra={k: v for k, v in d.items() if k not in _TEACHER_KEYS})

    def to_attrs(self) -> dict:
        return {**_present((k, getattr(self, k)) for k in _TEACHER_KEYS), **self.extra}

    def identity(self) -> dict:
        """What must match for a store to be continued with this teacher."""
        return {k: getattr(self, k) for k in IDENTITY_TEACHER_KEYS}


@dataclass(frozen=True)
class LayerSpec:
    """One stored feature layer: its index into the teachers' feature list and each teacher's feature shape."""

    index: int
    shapes: tuple[tuple[int, ...], ...]

    def to_attrs(self) -> dict:
        return {"index": self.index, "shapes": [list(s) for s in self.shapes]}


@dataclass(frozen=True)
class StoreDescription:
    """Everything a store records of itself (its attrs), typed.

    The identity (what a continuing run must match: :meth:`identity`) is the data, augmentation, teachers' weights
    and precision, dtypes, compressor, logits and features; beside it the store records its size (views, block
    rows), the teachers' provenance and accuracy, and words for plain zarr readers (``arrays``, ``compression``).
    ``views``, ``block_rows``, ``camkd_version`` and ``arrays`` are None in a description not yet written
    (the identity of a run, before its store exists).
    """

    dataset: DataIdentity
    augmentation: dict  # AugSpec.to_dict(): seed, recipe, padding, normalization
    teachers: tuple[TeacherRecord, ...]
    dtype: str
    feature_dtype: str
    compressor: str
    logits: LogitsSpec
    features: dict[str, LayerSpec]
    teacher_precision: str | None = None  # None: before it was recorded (fp32, see ``precision``)
    teacher_channels_last: bool | None = None
    teacher_tf32: dict | None = None  # tf32_of the device that made it, per op (None: before it was recorded: off)
    folder: FolderFields = FolderFields()
    format_version: int = layout.FORMAT_VERSION
    views: int | None = None
    block_rows: int | None = None
    camkd_version: str | None = None
    arrays: dict[str, str] | None = None
    compression: str | None = None  # zstd stores: in words
    feature_scale: str | None = None  # int8 stores: in words
    teacher_test_accuracy: list[float] | None = None
    topk_tail_mass: dict | None = None  # a finished top-k store's tail mass per temperature (summary.py)
    reopen: dict | None = None  # SplitOptions.to_dict() of the data (None: a store from before; see split_options)
    extra: dict = field(default_factory=dict)  # keys this camkd does not know, kept as they are

    # -- what readers ask -------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The --precision the teachers ran in (a store from before it was recorded: fp32)."""
        return self.teacher_precision if self.teacher_precision is not None else PRECISION_BEFORE

    @property
    def channels_last(self) -> bool:
        """Whether the teachers ran channels-last (a store from before it was recorded: no)."""
        return bool(self.teacher_channels_last)

    @property
    def tf32_ops(self) -> dict[str, bool]:
        """Per op (conv, matmul), whether the teachers' float32 ran in TF32 (a store from before it was recorded: no)."""
        return {op: bool((self.teacher_tf32 or {}).get(op)) for op in TF32_OPS}

    @property
    def tf32(self) -> bool:
        """Whether any of the teachers' float32 ops ran in TF32 (their outputs hold ~10 mantissa bits, not 24)."""
        return any(self.tf32_ops.values())

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    @cached_property
    def aug_layout(self) -> layout.AugLayout:
        """How ``aug`` (and ``pixels``) hold this store's views; refused when the recipe is not one this camkd replays."""
        return layout.aug_layout(self.augmentation)

    @property
    def keeps_pixels(self) -> bool:
        """Whether the store keeps a CRC-32 of every view (image folders)."""
        return self.aug_layout.pixels

    @property
    def int8_features(self) -> bool:
        return self.feature_dtype == "int8"

    def aug_spec(self) -> AugSpec:
        """The augmentation that made the store's views, as the data side replays it."""
        a = self.augmentation
        norm = Normalization(tuple(a["normalization"]["mean"]), tuple(a["normalization"]["std"]))
        return AugSpec(seed=a["seed"], norm=norm, padding=a["padding"], recipe=a["recipe"])

    def logit_arrays(self) -> list[str]:
        return layout.logit_arrays(self.logits)

    def feature_arrays(self) -> list[str]:
        """Every feature array (and the scale arrays of an int8 store)."""
        names = [layout.feature_path(layer, t) for layer, spec in self.features.items() for t in range(len(spec.shapes))]
        if self.int8_features:
            names += [layout.scale_path(layer, t) for layer, spec in self.features.items() for t in range(len(spec.shapes))]
        return names

    def view_arrays(self) -> list[str]:
        """Every [V, N, ...] array: what grows when views are added."""
        return [layout.AUG, layout.PROGRESS] + self.logit_arrays() + self.feature_arrays() \
            + ([layout.PIXELS] if self.keeps_pixels else [])

    @property
    def split_options(self) -> SplitOptions:
        """How to open the store's dataset again (its test split, its training samples): as recorded, or, for a
        store from before it was recorded, what its reader then derived from the data's kind and recorded form."""
        if self.reopen is not None:
            return SplitOptions.from_dict(self.reopen)
        ds = self.dataset
        return SplitOptions.of_form(ds.name, num_classes=ds.num_classes, image_size=ds.image_size, in_channels=ds.in_channels)

    def layer_indices(self) -> dict[str, int]:
        return {name: spec.index for name, spec in self.features.items()}

    # -- identity ---------------------------------------------------------------------------------
    def identity(self) -> dict:
        """Everything that must match for a store to be continued, in the attrs' words (differences.py names them);
        :data:`identity.RECORDED_ONLY` of it is recorded, not compared. The teachers' precision with its old meaning."""
        attrs = self.to_attrs()
        out = {k: attrs.get(k) for k in ("format_version", "dataset", "augmentation")}
        out["teachers"] = [t.identity() for t in self.teachers]
        out.update({"teacher_precision": self.precision, "teacher_channels_last": self.teacher_channels_last,
                    "dtype": self.dtype, "feature_dtype": self.feature_dtype, "compressor": self.compressor,
                    "logits": attrs["logits"], "features": attrs["features"], **self.folder.to_attrs()})
        return out

    # -- the attrs --------------------------------------------------------------------------------
    @staticmethod
    def from_attrs(a: dict) -> StoreDescription:
        """Parse a store's attrs (checked by layout.check_format first: the required keys are there)."""
        known = {"format_version", "dataset", "augmentation", "teachers", "teacher_precision", "teacher_channels_last",
                 "teacher_tf32", "dtype", "feature_dtype", "compressor", "logits", "features", *FOLDER_KEYS, "views", "block_rows",
                 "camkd_version", "arrays", "compression", "feature_scale", "teacher_test_accuracy", "topk_tail_mass",
                 "reopen"}
        return StoreDescription(
            dataset=DataIdentity.from_attrs(a["dataset"]), augmentation=a["augmentation"],
            teachers=tuple(TeacherRecord.from_attrs(t) for t in a["teachers"]), dtype=a["dtype"],
            feature_dtype=a["feature_dtype"], compressor=a["compressor"], logits=LogitsSpec.from_attrs(a),
            features={name: LayerSpec(s["index"], tuple(tuple(x) for x in s["shapes"])) for name, s in a["features"].items()},
            teacher_precision=a.get("teacher_precision"), teacher_channels_last=a.get("teacher_channels_last"),
            teacher_tf32=a.get("teacher_tf32"), folder=FolderFields.from_attrs(a), format_version=a["format_version"], views=a.get("views"),
            block_rows=a.get("block_rows"), camkd_version=a.get("camkd_version"), arrays=a.get("arrays"),
            compression=a.get("compression"), feature_scale=a.get("feature_scale"),
            teacher_test_accuracy=a.get("teacher_test_accuracy"), topk_tail_mass=a.get("topk_tail_mass"),
            reopen=a.get("reopen"),
            extra={k: v for k, v in a.items() if k not in known})

    def to_attrs(self) -> dict:
        """The attrs as stored, in the format's key order; what the store does not record is left out."""
        out = {"format_version": self.format_version, "dataset": self.dataset.to_attrs(), "augmentation": self.augmentation,
               "teachers": [t.to_attrs() for t in self.teachers]}
        out.update(_present([("teacher_precision", self.teacher_precision),
                             ("teacher_channels_last", self.teacher_channels_last),
                             ("teacher_tf32", self.teacher_tf32)]))
        out.update({"dtype": self.dtype, "feature_dtype": self.feature_dtype, "compressor": self.compressor,
                    "logits": self.logits.to_dict(),
                    "features": {name: spec.to_attrs() for name, spec in self.features.items()}})
        out.update(self.folder.to_attrs())
        out.update(_present([("reopen", self.reopen)]))
        out.update(_present((k, getattr(self, k)) for k in ("views", "block_rows", "camkd_version", "arrays", "compression",
                                                             "feature_scale", "teacher_test_accuracy", "topk_tail_mass")))
        out.update(self.extra)
        return out
