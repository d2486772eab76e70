"""File listings of image-folder datasets: (relative path, byte size, label) per sample, nothing decoded.

A :class:`Listing` identifies the data of an image folder the way image and label bytes identify an
in-memory :class:`camkd.data.base.Dataset`: its fingerprint hashes every relative path, byte size and
label, so ImageNet (1,281,167 files) is listed and fingerprinted from directory entries and ``stat``
alone, without opening a file.

Two layouts:

- ``imagefolder`` (:func:`list_imagefolder`): ImageNet's ``ROOT/train/CLASS/...`` and
  ``ROOT/val/CLASS/...``. Classes, sample order and labels equal torchvision's ``ImageFolder``
  (``find_classes`` + ``make_dataset``), restricted to :data:`EXTENSIONS`.
- ``tinyimagenet`` (:func:`list_tinyimagenet`): tiny-imagenet-200 as distributed (``wnids.txt``,
  ``train/WNID/images/*.JPEG``, ``val/images/*`` labelled by ``val/val_annotations.txt``).

:func:`check_unchanged` re-lists a folder and refuses it, naming the first changed file, when it
differs from a recorded listing (a store written from other files must not be distilled from these).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from camkd.data.base import limits
from camkd.errors import CamkdError
from camkd.words import plural

EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File endings listed (compared lower-cased, so ``.JPEG`` counts): the JPEG and PNG part of torchvision's
``IMG_EXTENSIONS``. Other files (``.txt``, ``.bmp``, ...) are skipped, as ImageFolder skips non-images."""

SPLIT_FOLDERS = {"train": "train", "test": "val"}
"""camkd's split name -> the folder under the dataset root that holds it."""

_EXTENSION_WORDS = ".jpg, .jpeg or .png"
_LAYOUT = "ImageNet's layout: ROOT/train/CLASS/*.JPEG and ROOT/val/CLASS/*.JPEG"


@dataclass(frozen=True, eq=False)
class Listing:
    """One split of an image-folder dataset as files: sample ``i`` is ``root/paths[i]`` with label ``labels[i]``.

    ``paths`` are POSIX paths relative to ``root`` (so the fingerprint does not depend on where the folder
    lives), ``sizes`` their byte sizes and ``labels`` indices into ``classes``; both arrays are int64 and
    read-only.
    """

    name: str
    root: str
    split: str
    paths: tuple[str, ...]
    sizes: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    whole: bool = True  # every file of the folder's split (False: its first N, --limit N)

    def __post_init__(self) -> None:
        n = len(self.paths)
        for field_name in ("sizes", "labels"):
            array = np.array(getattr(self, field_name), dtype=np.int64)
            if array.shape != (n,):
                raise ValueError(f"{field_name} must be [{n}] like paths, got shape {array.shape}")
            array.setflags(write=False)
            object.__setattr__(self, field_name, array)
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "classes", tuple(self.classes))
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def file(self, i: int) -> str:
        """The path of sample ``i`` on this machine (``root`` joined with its relative path)."""
        return os.path.join(self.root, self.paths[i])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over name, split, classes and every (relative path, byte size, label); never file contents.

        The root is left out: the same files in another folder or on another machine fingerprint the same.
        """
        h = hashlib.sha256()
        h.update(json.dumps({"name": self.name, "split": self.split, "classes": list(self.classes), "n": len(self)}).encode())
        h.update("\0".join(self.paths).encode("utf-8", "surrogateescape"))  # "\0" cannot occur in a file name
        h.update(self.sizes.astype("<i8").tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def limit(self, n: int | None) -> Listing:
        """The first ``n`` samples (all when ``n`` is None); more than the split holds is refused, not capped.

        The classes stay whole, so labels and the model's output size do not change with ``n``.
        """
        if not limits(n, len(self), self.name, self.split):
            return self
        return Listing(self.name, self.root, self.split, self.paths[:n], self.sizes[:n], self.labels[:n], self.classes,
                       whole=False)

    def to_dict(self) -> dict:
        """JSON-ready record of the listing (with its fingerprint), for a store to keep; see :meth:`from_dict`."""
        return {"name": self.name, "root": self.root, "split": self.split, "classes": list(self.classes),
                "paths": list(self.paths), "sizes": self.sizes.tolist(), "labels": self.labels.tolist(),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, record: dict) -> Listing:
        """The listing :meth:`to_dict` recorded; a record whose entries no longer match its fingerprint is refused."""
        try:
            listing = cls(record["name"], record["root"], record["split"], record["paths"], record["sizes"], record["labels"],
                          record["classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise CamkdError(f"the recorded file listing is malformed ({e}); rebuild the store") from e
        if listing.fingerprint != record.get("fingerprint"):
            raise CamkdError("the recorded file listing does not match its fingerprint (the record is damaged); rebuild the store")
        return listing


def _scan(path: str) -> list[os.DirEntry]:
    """The entries of one folder; an unreadable folder is a CamkdError naming it."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as e:
        raise CamkdError(f"cannot read the folder {path}: {e.strerror or e}") from e


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder, following symlinks; a broken link is a file, as in ``os.walk``."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _image_files(root: str, rel: str) -> tuple[list[str], list[int]]:
    """Relative paths and byte sizes of the image files under ``root/rel``, in ImageFolder's order.

    ``make_dataset`` walks ``sorted(os.walk(class_dir, followlinks=True))`` (folders by their full path)
    and each folder's file names sorted; this does the same with one ``os.scandir`` per folder and the
    entry's ``stat`` for the size (no file is opened).
    """
    folders: list[tuple[str, list[tuple[str, int]]]] = []
    pending = [rel]
    while pending:
        folder = pending.pop()
        files = []
        for entry in _scan(os.path.join(root, folder)):
            if _is_dir(entry):
                pending.append(f"{folder}/{entry.name}")
            elif entry.name.lower().endswith(EXTENSIONS):
                files.append((entry.name, _size(entry, f"{folder}/{entry.name}")))
        folders.append((folder, files))
    folders.sort(key=lambda item: item[0])  # every folder starts with rel, so this is os.walk's sort by full path
    paths, sizes = [], []
    for folder, files in folders:
        for name, size in sorted(files):
            paths.append(f"{folder}/{name}")
            sizes.append(size)
    return paths, sizes


def _size(entry: os.DirEntry, rel: str) -> int:
    """Byte size of a listed file (its target's, for a symlink); an unreadable one is a CamkdError naming it."""
    try:
        return entry.stat().st_size
    except OSError as e:
        raise CamkdError(f"cannot read the size of {rel}: {e.strerror or e}; fix or remove the file") from e


def _class_folders(split_dir: str) -> list[str]:
    """Sorted names of the folders in ``split_dir``, as torchvision's ``find_classes`` (symlinked folders count)."""
    return sorted(entry.name for entry in _scan(split_dir) if _is_dir(entry))


def _some(names: list[str] | set[str], most: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e (and 7 more)``: names for an error line that stays one readable line."""
    names = sorted(names)
    more = f" (and {len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _root(root: str | Path, name: str) -> str:
    """``root`` as an absolute path string; a missing folder is a CamkdError."""
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(path):
        raise CamkdError(f"the {name} folder {path} does not exist; give --data-dir the folder that holds train/ and val/")
    return path


def _split_folder(root: str, split: str, name: str) -> str:
    """The folder name of ``split`` under ``root`` ('train' or 'val'), checked to exist."""
    if split not in SPLIT_FOLDERS:
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    folder = SPLIT_FOLDERS[split]
    if not os.path.isdir(os.path.join(root, folder)):
        raise CamkdError(f"{root} has no {folder}/ folder for the {split} split of {name}; "
                         f"expected {_LAYOUT if name == 'imagefolder' else 'tiny-imagenet-200 as distributed'}")
    return folder


def _list_class_folders(root: str, folder: str, classes: list[str]) -> tuple[list[str], list[int], list[int]]:
    """Paths, sizes and labels of ``root/folder/CLASS/...`` for every class in order; a class without images is refused."""
    paths, sizes, labels, empty = [], [], [], []
    for label, cls in enumerate(classes):
        class_paths, class_sizes = _image_files(root, f"{folder}/{cls}")
        if not class_paths:
            empty.append(cls)
        paths += class_paths
        sizes += class_sizes
        labels += [label] * len(class_paths)
    if empty:
        raise CamkdError(f"{root}/{folder} has {len(empty)} class folder(s) without a {_EXTENSION_WORDS} file: {_some(empty)}; "
                         f"add their images or remove the folders")
    return paths, sizes, labels


def _classes_of(root: str, folder: str) -> list[str]:
    """The class folders of ``root/folder``; none is a CamkdError."""
    classes = _class_folders(os.path.join(root, folder))
    if not classes:
        raise CamkdError(f"{root}/{folder} holds no class folder; expected {_LAYOUT}")
    return classes


def list_imagefolder(root: str | Path, split: str) -> Listing:
    """List ``split`` ('train' -> ``ROOT/train``, 'test' -> ``ROOT/val``) of an image folder in ImageNet's layout.

    Classes are the folder names of ``ROOT/train``, sorted, indexed from 0, and the samples come in the
    order of ``torchvision.datasets.ImageFolder(ROOT/train or ROOT/val).samples`` with the same labels,
    restricted to :data:`EXTENSIONS` (files found recursively under each class folder, following
    symlinks). ``ROOT/val`` must have exactly the classes of ``ROOT/train``: checkpoints trained with
    ImageFolder keep their class order. Nothing is opened or decoded; sizes come from ``stat``.
    """
    root = _root(root, "imagefolder")
    folder = _split_folder(root, split, "imagefolder")
    classes = _train_classes(root)
    if folder != "train":
        _check_classes(root, folder, classes, f"those of {root}/train")
    paths, sizes, labels = _list_class_folders(root, folder, classes)
    return Listing("imagefolder", root, split, paths, sizes, labels, classes)


def _train_classes(root: str) -> list[str]:
    """The classes of ``root/train``, which index the labels of every split."""
    if not os.path.isdir(os.path.join(root, "train")):
        raise CamkdError(f"{root} has no train/ folder, whose class folders name and order the classes; expected {_LAYOUT}")
    return _classes_of(root, "train")


def _check_classes(root: str, folder: str, classes: list[str], source: str) -> None:
    """Refuse ``root/folder`` when its class folders are not exactly ``classes`` (from ``source``), naming the differences."""
    found = _classes_of(root, folder)
    if found != classes:
        missing, extra = set(classes) - set(found), set(found) - set(classes)
        parts = ([f"{folder}/ lacks {_some(missing)}"] if missing else []) + ([f"{folder}/ has extra {_some(extra)}"] if extra else [])
        raise CamkdError(f"the class folders of {root}/{folder} differ from {source}: {'; '.join(parts)}; "
                         "make them match")


def list_tinyimagenet(root: str | Path, split: str) -> Listing:
    """List ``split`` of tiny-imagenet-200 as distributed ('train' -> ``train/``, 'test' -> ``val/``).

    Classes are the wnids of ``wnids.txt``, sorted: the order ``ImageFolder(ROOT/train)`` gives, so both
    agree. ``train/`` is listed exactly as ImageFolder lists it (its class folders must be the wnids; the
    distributed ``WNID_boxes.txt`` files are skipped, leaving ``train/WNID/images/*.JPEG``). ``val/images/*``
    is listed by sorted file name, each image labelled by ``val/val_annotations.txt`` (tab-separated
    file, wnid, box); an image without annotation, an annotated file that is missing and an unknown wnid
    are refused. The unlabelled ``test/`` folder of the download is not used.
    """
    root = _root(root, "tinyimagenet")
    folder = _split_folder(root, split, "tinyimagenet")
    classes = _wnids(root)
    if folder == "train":
        _check_classes(root, folder, classes, f"the wnids of {root}/wnids.txt")
        paths, sizes, labels = _list_class_folders(root, folder, classes)
    else:
        paths, sizes, labels = _list_tiny_val(root, {wnid: i for i, wnid in enumerate(classes)})
    return Listing("tinyimagenet", root, split, paths, sizes, labels, classes)


def _wnids(root: str) -> list[str]:
    """The sorted class ids of ``root/wnids.txt`` (one per line); missing, empty or repeated ids are refused."""
    path = os.path.join(root, "wnids.txt")
    try:
        with open(path, encoding="utf-8") as f:
            wnids = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CamkdError(f"cannot read {path} ({e.strerror or e}); give --data-dir the tiny-imagenet-200 folder as distributed") from e
    if not wnids:
        raise CamkdError(f"{path} names no class; it should list one wnid per line")
    repeated = {wnid for wnid, count in Counter(wnids).items() if count > 1}
    if repeated:
        raise CamkdError(f"{path} names {_some(repeated)} more than once; each class must appear once")
    return sorted(wnids)


def _val_annotations(root: str, class_index: dict[str, int]) -> dict[str, int]:
    """File name -> label from ``val/val_annotations.txt``; an unknown wnid or a malformed line is refused."""
    path = os.path.join(root, "val", "val_annotations.txt")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CamkdError(f"cannot read {path} ({e.strerror or e}); it labels the val images of tiny-imagenet-200") from e
    labels: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise CamkdError(f"{path} line {number} is not 'FILE<tab>WNID...': {line!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in class_index:
            raise CamkdError(f"{path} line {number} labels {name} with {wnid}, which wnids.txt does not name")
        if labels.setdefault(name, class_index[wnid]) != class_index[wnid]:
            raise CamkdError(f"{path} labels {name} twice, with different wnids (line {number})")
    return labels


def _list_tiny_val(root: str, class_index: dict[str, int]) -> tuple[list[str], list[int], list[int]]:
    """Paths, sizes and labels of ``val/images/*`` by sorted file name, checked against the annotations both ways."""
    annotations = _val_annotations(root, class_index)
    images_dir = os.path.join(root, "val", "images")
    if not os.path.isdir(images_dir):
        raise CamkdError(f"{root}/val has no images/ folder; expected tiny-imagenet-200 as distributed (val/images/*.JPEG)")
    files = sorted((e.name, e) for e in _scan(images_dir) if not _is_dir(e) and e.name.lower().endswith(EXTENSIONS))
    names = [name for name, _ in files]
    unlabelled = set(names) - set(annotations)
    if unlabelled:
        raise CamkdError(f"{len(unlabelled)} val image(s) have no line in {root}/val/val_annotations.txt: {_some(unlabelled)}")
    missing = set(annotations) - set(names)
    if missing:
        raise CamkdError(f"{len(missing)} file(s) annotated in {root}/val/val_annotations.txt are not in val/images: {_some(missing)}")
    if not names:
        raise CamkdError(f"{images_dir} holds no {_EXTENSION_WORDS} file")
    paths = [f"val/images/{name}" for name in names]
    return paths, [_size(entry, path) for (_, entry), path in zip(files, paths)], [annotations[name] for name in names]


LISTERS: dict[str, Callable[[str | Path, str], Listing]] = {"imagefolder": list_imagefolder, "tinyimagenet": list_tinyimagenet}
"""Listing name -> the function that lists its layout (what :func:`check_unchanged` re-runs)."""


def check_unchanged(recorded: Listing, root: str | Path) -> Listing:
    """Re-list ``root`` as ``recorded`` was listed and return the new listing's first ``len(recorded)`` files when
    they are the same data.

    A store holds the first N files of its folder's listing (all of them, or ``--limit N``): only those are
    compared, so files after them (beyond the limit) may change freely. Otherwise a CamkdError names the first file
    added, removed, replaced (size changed) or relabelled among them, with the count of each: distillation must not
    read other files than the teachers saw. A file rewritten with the same byte size is not seen here (nothing is
    read); the per-view pixel hashes catch that.
    """
    if recorded.name not in LISTERS:
        raise CamkdError(f"the recorded listing is of '{recorded.name}', which camkd cannot list; choose {' or '.join(LISTERS)}")
    whole = LISTERS[recorded.name](root, recorded.split)
    current = whole.limit(min(len(recorded), len(whole)))
    if current.fingerprint == recorded.fingerprint:
        return current
    if current.classes != recorded.classes:
        raise CamkdError(f"the classes of {current.root} changed since the store was written "
                         f"({len(recorded.classes)} then, {len(current.classes)} now); restore the folder or rebuild the store")
    which = f"the first {len(recorded)} files of {current.root}" if len(whole) > len(recorded) else current.root
    raise CamkdError(f"{which} changed since the store was written: {_differences(recorded, current, set(whole.paths))}; "
                     f"restore the files or rebuild the store from this folder")


def check_none_added(recorded: Listing, root: str | Path) -> None:
    """A store made from every file of its folder (no --limit) refuses the folder once files were added after the
    recorded ones in path order (an addition among them is :func:`check_unchanged`'s): distilling would silently
    leave them out. Call it once the recorded files are known unchanged."""
    whole = LISTERS[recorded.name](root, recorded.split)
    added = whole.paths[len(recorded):]
    if added:
        raise CamkdError(f"{plural(len(added), 'file')} of {whole.root} {'was' if len(added) == 1 else 'were'} added since "
                         f"the store was written from the whole folder (first: {added[0]}), so the store would leave "
                         "them out; remove them, rebuild the store from this folder, or cache the first N files with "
                         "--limit N")


def _differences(recorded: Listing, current: Listing, present: set[str]) -> str:
    """``train/a/x.jpg was added (and 2 other changes: 1 removed, 1 replaced)``: the first change in path order in
    plain words, then how many others of each kind. ``current`` is the folder's first ``len(recorded)`` files and
    ``present`` every file of the folder: a recorded file that is still there but pushed past the first N (by an
    addition before it) is said to be so, as a consequence, not counted as a change of its own."""
    then = dict(zip(recorded.paths, zip(recorded.sizes.tolist(), recorded.labels.tolist())))
    now = dict(zip(current.paths, zip(current.sizes.tolist(), current.labels.tolist())))
    gone = then.keys() - now.keys()
    changes: dict[str, list[tuple[str, str]]] = {
        "added": [(p, f"{p} was added") for p in now.keys() - then.keys()],
        "removed": [(p, f"{p} was removed") for p in gone - present],
        "replaced": [],
        "relabelled": [],
    }
    for path in then.keys() & now.keys():
        (size_then, label_then), (size_now, label_now) = then[path], now[path]
        if size_then != size_now:
            changes["replaced"].append((path, f"{path} was replaced ({size_then} bytes then, {size_now} now)"))
        elif label_then != label_now:
            changes["relabelled"].append((path, f"{path} was relabelled ({recorded.classes[label_then]} then, "
                                                f"{current.classes[label_now]} now)"))
    first = min((item for items in changes.values() for item in items), default=("", "the file order changed"))
    others = {kind: sum(p != first[0] for p, _ in items) for kind, items in changes.items()}
    text = first[1]
    if sum(others.values()):
        counts = ", ".join(f"{n} {kind}" for kind, n in others.items() if n)
        text += f" (and {plural(sum(others.values()), 'other change')}: {counts})"
    pushed = sorted(gone & present)
    if pushed:
        text += (f"; so {pushed[0]}{f' and {len(pushed) - 1} more' if len(pushed) > 1 else ''} "
                 f"{'is' if len(pushed) == 1 else 'are'} no longer among the first {plural(len(recorded), 'file')}")
    return text
