"""What `camkd cache-teachers` is asked to write: the options, checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.data import check_dataset
from camkd.errors import CamkdError
from camkd.store.location import Location, parse_location

# teacher batch per device type: large enough to keep the device busy, small enough that the
# activations of one batch are reused by the allocator instead of mapped and unmapped each batch
DEFAULT_BATCH = {"cpu": 64, "cuda": 256}


@dataclass
class CacheConfig:
    teachers: list[str]
    dataset: str
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None
    views: int = 1
    aug_seed: int = 0  # the seed of the augmentation views
    features: list[str] = field(default_factory=lambda: ["penultimate"])  # what camkd (the default method) needs
    dtype: str = "float16"
    feature_dtype: str | None = None  # None: same as dtype; "int8": int8 with a float32 per-(sample, channel) scale
    compressor: str = "none"  # "zstd": zarr's ZstdCodec (level 3) on the view x sample arrays, before the crc32c
    batch_size: int | None = None  # None: per device (DEFAULT_BATCH)
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    options: dict = field(default_factory=dict)  # dataset loader options, e.g. synthetic's num_samples, num_classes
    dry_run: bool = False  # print the planned size and the free space, write nothing
    space_check: bool = True  # refuse to start when the planned store does not fit the free space
    evaluate: bool = True  # measure each teacher's test accuracy when creating the store
    logits: str = "dense"  # "topk:K": the k largest logits per teacher plus exact scalars (store/topk.py)
    kd_T: list[float] = field(default_factory=lambda: [4.0])  # top-k: the temperatures to distill at
    precision: str = "fp32"  # the teachers' forward: fp32 | bf16 | fp16 autocast (the stored dtype is its own option)
    channels_last: bool = False  # the teachers and their input batches in NHWC memory format

    @property
    def stored_feature_dtype(self) -> str:
        return self.feature_dtype or self.dtype

    def out_path(self, archs: list[str]) -> Location:
        """Where the store goes: --out (a path, or an s3:// gs:// file:// URL), else cache/DATASET_ARCHS_sSEED.zarr."""
        if self.out:
            return parse_location(self.out)
        return parse_location(Path("cache") / f"{self.dataset}_{'-'.join(archs)}_s{self.aug_seed}.zarr")


def check_options(cfg: CacheConfig) -> dict[str, int]:
    """Every option that can be checked before anything loads; returns the feature layers ({name: index})."""
    if not cfg.teachers:
        raise CamkdError("give at least one --teacher CKPT (or ARCH=CKPT for a reference checkpoint)")
    if cfg.views < 1:
        raise CamkdError("--views must be at least 1")
    if cfg.dtype not in layout.DTYPES:
        raise CamkdError(f"unknown --dtype '{cfg.dtype}'; choose float16 or float32")
    if cfg.feature_dtype is not None and cfg.feature_dtype not in layout.FEATURE_DTYPES:
        raise CamkdError(f"unknown --feature-dtype '{cfg.feature_dtype}'; choose float16, float32 or int8")
    if cfg.compressor not in layout.COMPRESSORS:
        raise CamkdError(f"unknown --compressor '{cfg.compressor}'; choose none or zstd")
    check_dataset(cfg.dataset)
    layers = parse_layers(cfg.features)
    if cfg.feature_dtype is not None and not layers:
        raise CamkdError(f"--feature-dtype {cfg.feature_dtype} sets the type of stored features, but -f none stores no "
                         "features; drop --feature-dtype or store a layer (-f penultimate)")
    topk.parse_logits(cfg.logits, cfg.kd_T)  # the syntax; the classes are checked once the data is loaded
    return layers


def batch_size_for(cfg: CacheConfig, device: torch.device) -> int:
    if cfg.batch_size is not None:
        if cfg.batch_size < 1:
            raise CamkdError("--batch-size must be at least 1")
        return cfg.batch_size
    return DEFAULT_BATCH.get(device.type, 256)


def parse_layers(texts: list[str]) -> dict[str, int]:
    """--features values -> {layer name: feature index}; 'none' alone stores no features."""
    if len(texts) > 1 and any(t.strip().lower() == "none" for t in texts):
        raise CamkdError(f"-f none stores no features, but layers are given too ({', '.join(texts)}); give either none "
                         "or the layers")
    layers = {}
    for text in texts:
        parsed = layout.parse_layer(text)
        if parsed is not None:
            layers[parsed[0]] = parsed[1]
    return layers
