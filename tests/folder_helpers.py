"""Small image folders the tests build (ImageNet's layout and tiny-imagenet-200's), and the ``folder`` fixture
(shared through conftest.py): JPEG and PNG, non-square 40-90 px, 3 classes.
"""

import numpy as np
import pytest
from PIL import Image

CLASSES = ("ant", "bee", "cat")
SIZE = "32"


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    """A learnable, non-square image: the class's colour plus noise, 40-90 px on each side."""
    h, w = (int(v) for v in rng.integers(40, 91, size=2))
    colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], dtype=np.float64)
    a = colour + rng.normal(0, 30, size=(h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_folder(root, *, train: int = 8, val: int = 4, seed: int = 0, classes: tuple[str, ...] = CLASSES):
    """ROOT/train/CLASS/*.jpg|png and ROOT/val/CLASS/*: ``train`` and ``val`` images per class, every third a PNG
    (``classes``: the folder names, three at most)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                ext = "png" if i % 3 == 2 else "jpg"
                _image(rng, label).save(root / split / cls / f"{cls}_{i:02d}.{ext}", quality=90)
    return root


def make_tiny(root, folder):
    """A tiny-imagenet-200 layout of the same images (JPEGs only, as distributed)."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(CLASSES) + "\n")
    lines = []
    for cls in CLASSES:
        (root / "train" / cls / "images").mkdir(parents=True)
        for f in sorted((folder / "train" / cls).iterdir()):
            Image.open(f).convert("RGB").save(root / "train" / cls / "images" / f"{f.stem}.JPEG", quality=90)
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        for f in sorted((folder / "val" / cls).iterdir()):
            Image.open(f).convert("RGB").save(root / "val" / "images" / f"val_{f.stem}.JPEG", quality=90)
            lines.append(f"val_{f.stem}.JPEG\t{cls}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagefolder") / "data")
