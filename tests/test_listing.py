"""File listings of image folders: ImageFolder's classes, order and labels; sizes; fingerprint; changes; errors."""

import builtins
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from camkd.data.listing import Listing, check_unchanged, list_imagefolder, list_tinyimagenet
from camkd.errors import CamkdError

# class -> files under its folder; sorted names and walk order are chosen to trip a naive sort:
# upper case before lower case, "sub-2" before "sub/...", files at the top before those in subfolders
TRAIN = {
    "Zebra": ["b.png", "a.JPG"],
    "ant": ["x.jpeg", "sub/deeper/z.PNG", "sub/y.jpg", "sub-2/w.JPEG", "notes.txt"],
    "ant-b": ["only.jpg"],
    "cat": ["c.jpg", "broken.jpg", "README"],
}


def write_image(path, seed: int) -> None:
    """A small non-square JPEG or PNG (by the path's extension) with random pixels; 'broken*' gets bytes that are no image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.startswith("broken"):
        path.write_bytes(b"not a jpeg at all")
        return
    if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        path.write_text("not an image")
        return
    rng = np.random.default_rng(seed)
    height, width = 9 + seed % 7, 13 + 3 * (seed % 5)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, "PNG" if path.suffix.lower() == ".png" else "JPEG")


def make_imagefolder(root, classes=TRAIN, splits=("train", "val")):
    """ImageNet's layout under ``root``: SPLIT/CLASS/files, plus a symlinked subfolder in train/cat."""
    for split in splits:
        for k, (cls, names) in enumerate(classes.items()):
            for j, name in enumerate(names):
                write_image(root / split / cls / name, 10 * k + j)
    outside = root / "outside"
    write_image(outside / "linked.png", 99)
    (root / "train" / "cat" / "link").symlink_to(outside, target_is_directory=True)
    return root


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "data")


@pytest.mark.parametrize("split, sub", [("train", "train"), ("test", "val")])
def test_imagefolder_equals_torchvision(folder, split, sub):
    listing = list_imagefolder(folder, split)
    reference = ImageFolder(str(folder / sub))
    assert list(listing.classes) == reference.classes == ["Zebra", "ant", "ant-b", "cat"]
    assert [listing.file(i) for i in range(len(listing))] == [path for path, _ in reference.samples]
    assert listing.labels.tolist() == reference.targets
    assert listing.labels.dtype == listing.sizes.dtype == np.int64
    assert listing.sizes.tolist() == [os.path.getsize(path) for path, _ in reference.samples]
    assert all("\\" not in p and not p.startswith("/") and p.startswith(f"{sub}/") for p in listing.paths)
    assert "train/cat/link/linked.png" in listing.paths or split == "test"  # symlinked folders are followed
    assert not any(p.endswith(("notes.txt", "README")) for p in listing.paths)


def test_other_image_types_are_skipped(folder):
    write_image(folder / "train" / "cat" / "d.bmp", 3)  # in torchvision's IMG_EXTENSIONS, not in ours
    assert not any(p.endswith(".bmp") for p in list_imagefolder(folder, "train").paths)


def test_listing_opens_no_file(folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"listing opened {args[0]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    listing = list_imagefolder(folder, "train")
    assert "train/cat/broken.jpg" in listing.paths  # not a JPEG inside, listed all the same


def test_fingerprint_is_stable_and_independent_of_the_root(folder, tmp_path):
    first, second = list_imagefolder(folder, "train"), list_imagefolder(folder, "train")
    assert first.fingerprint == second.fingerprint
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved, symlinks=True)
    assert list_imagefolder(moved, "train").fingerprint == first.fingerprint
    assert list_imagefolder(folder, "test").fingerprint != first.fingerprint
    assert check_unchanged(first, moved).root == str(moved)


@pytest.mark.parametrize("change, named", [
    (lambda root: write_image(root / "train" / "ant" / "sub" / "new.jpg", 5),
     r"train/ant/sub/new\.jpg was added; so \S+ is no longer among the first 10 files; restore"),
    (lambda root: (root / "train" / "Zebra" / "b.png").unlink(), r"train/Zebra/b\.png was removed; restore"),
    (lambda root: (root / "train" / "cat" / "c.jpg").write_bytes(b"x" * 7), r"train/cat/c\.jpg was replaced \(\d+ bytes then, 7 now\)"),
])
def test_a_changed_folder_is_refused_naming_the_file(folder, change, named):
    recorded = list_imagefolder(folder, "train")
    change(folder)
    assert list_imagefolder(folder, "train").fingerprint != recorded.fingerprint
    with pytest.raises(CamkdError, match=f"changed since the store was written: {named}") as e:
        check_unchanged(recorded, folder)
    assert "rebuild the store" in one_line_error(e)


def test_a_changed_class_set_is_refused(folder):
    recorded = list_imagefolder(folder, "train")
    write_image(folder / "train" / "dog" / "a.jpg", 1)
    with pytest.raises(CamkdError, match=r"classes of .* changed since the store was written \(4 then, 5 now\)") as e:
        check_unchanged(recorded, folder)
    one_line_error(e)


def test_limit_and_record(folder):
    listing = list_imagefolder(folder, "train")
    first = listing.limit(3)
    assert first.paths == listing.paths[:3] and first.labels.tolist() == listing.labels[:3].tolist()
    assert first.classes == listing.classes and first.fingerprint != listing.fingerprint
    assert listing.limit(None) is listing and listing.limit(len(listing)) is listing
    with pytest.raises(CamkdError, match=rf"--limit {len(listing) + 1} is more than the {len(listing)} samples"):
        listing.limit(len(listing) + 1)
    with pytest.raises(CamkdError, match="--limit must be positive"):
        listing.limit(0)
    record = listing.to_dict()
    again = Listing.from_dict(record)
    assert again.fingerprint == listing.fingerprint and again.paths == listing.paths and again.root == listing.root
    record["sizes"][0] += 1
    with pytest.raises(CamkdError, match="does not match its fingerprint"):
        Listing.from_dict(record)
    with pytest.raises(ValueError):
        listing.sizes[0] = 1  # read-only: a listing cannot drift from its fingerprint


@pytest.mark.parametrize("setup, split, message", [
    (lambda root: None, "train", r"imagefolder folder .*missing does not exist; give --data-dir"),
    (lambda root: root.mkdir(), "train", r"has no train/ folder for the train split of imagefolder; expected ImageNet's layout"),
    (lambda root: make_imagefolder(root, splits=("train",)), "test", r"has no val/ folder for the test split"),
    (lambda root: (root / "val" / "x").mkdir(parents=True), "test", r"has no train/ folder, whose class folders name and order"),
    (lambda root: (root / "train").mkdir(parents=True), "train", r"train holds no class folder; expected ImageNet's layout"),
    (lambda root: write_image(root / "train" / "a" / "notes.txt", 0), "train",
     r"train has 1 class folder\(s\) without a \.jpg, \.jpeg or \.png file: a; add their images or remove"),
    (lambda root: (make_imagefolder(root), shutil.rmtree(root / "val" / "ant"), write_image(root / "val" / "bee" / "a.jpg", 0)), "test",
     r"class folders of .*/val differ from those of .*/train: val/ lacks ant; val/ has extra bee; make them match"),
    (lambda root: make_imagefolder(root), "valid", r"unknown split 'valid'; choose train or test"),
])
def test_imagefolder_errors(tmp_path, setup, split, message):
    root = tmp_path / "missing"
    setup(root)
    with pytest.raises(CamkdError, match=message) as e:
        list_imagefolder(root, split)
    one_line_error(e)


WNIDS = ["n03", "n01", "n02"]  # wnids.txt's order is not sorted; classes are


def make_tinyimagenet(root, n_val=12):
    """tiny-imagenet-200 as distributed, small: wnids.txt, train/WNID/{WNID_boxes.txt, images/*.JPEG}, val/images + annotations."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
        for j in range(3):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 10 * k + j)
    lines = []
    for i in range(n_val):
        write_image(root / "val" / "images" / f"val_{i}.JPEG", i)
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % 3]}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "test" / "images" / "test_0.JPEG", 0)  # unlabelled in the download: never listed
    return root


def test_tinyimagenet(tmp_path):
    root = make_tinyimagenet(tmp_path / "tiny-imagenet-200")
    train = list_tinyimagenet(root, "train")
    reference = ImageFolder(str(root / "train"))
    assert list(train.classes) == reference.classes == sorted(WNIDS)
    assert [train.file(i) for i in range(len(train))] == [path for path, _ in reference.samples]
    assert train.labels.tolist() == reference.targets and len(train) == 9
    assert train.paths[0] == "train/n01/images/n01_0.JPEG"
    val = list_tinyimagenet(root, "test")
    names = sorted(f"val_{i}.JPEG" for i in range(12))  # val_0, val_1, val_10, val_11, val_2, ...
    assert list(val.paths) == [f"val/images/{name}" for name in names]
    assert val.labels.tolist() == [sorted(WNIDS).index(WNIDS[int(name[4:-5]) % 3]) for name in names]
    assert val.sizes.tolist() == [os.path.getsize(root / p) for p in val.paths]
    assert val.classes == train.classes and val.name == "tinyimagenet" and val.split == "test"
    assert check_unchanged(val, root).fingerprint == val.fingerprint


def annotate(root, line):
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write(line + "\n")


@pytest.mark.parametrize("damage, split, message", [
    (lambda root: (root / "wnids.txt").unlink(), "train", r"cannot read .*wnids\.txt .*give --data-dir the tiny-imagenet-200 folder"),
    (lambda root: (root / "wnids.txt").write_text("n01\nn02\nn01\nn03\n"), "train", r"wnids\.txt names n01 more than once"),
    (lambda root: annotate(root, "val_12.JPEG\tn09\t0\t0\t1\t1"), "test",
     r"line 13 labels val_12\.JPEG with n09, which wnids\.txt does not name"),
    (lambda root: annotate(root, "val_99.JPEG\tn01\t0\t0\t1\t1"), "test",
     r"1 file\(s\) annotated in .* are not in val/images: val_99\.JPEG"),
    (lambda root: write_image(root / "val" / "images" / "val_50.JPEG", 1), "test", r"1 val image\(s\) have no line in .*: val_50\.JPEG"),
    (lambda root: annotate(root, "val_0.JPEG\tn02\t0\t0\t1\t1"), "test", r"labels val_0\.JPEG twice, with different wnids"),
    (lambda root: write_image(root / "train" / "n07" / "images" / "a.JPEG", 1), "train",
     r"class folders of .*/train differ from the wnids of .*wnids\.txt: train/ has extra n07"),
    (lambda root: shutil.rmtree(root / "val"), "test", r"has no val/ folder for the test split of tinyimagenet"),
])
def test_tinyimagenet_errors(tmp_path, damage, split, message):
    root = make_tinyimagenet(tmp_path / "tiny")
    damage(root)
    with pytest.raises(CamkdError, match=message) as e:
        list_tinyimagenet(root, split)
    one_line_error(e)
