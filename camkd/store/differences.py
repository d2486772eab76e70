"""How a store's identity differs from a run's, in the words of the options that set it.

check_target (identity.py) refuses to continue a store made differently; this module says how, one phrase per
difference, naming the option (``--aug-seed 0 in the store, 5 now``) instead of the identity's internal keys,
and hashes by their first 12 hex digits.
"""

from __future__ import annotations

import camkd.store.layout as layout
from camkd.words import plural

HASH_DIGITS = 12

# identity key -> the option that sets it (keys not listed are named in words by _other)
OPTIONS = {
    "dataset.name": "--dataset",
    "dataset.image_size": "--image-size",
    "augmentation.seed": "--aug-seed",
    "dtype": "--dtype",
    "feature_dtype": "--feature-dtype",
    "compressor": "--compressor",
    "logits": "--logits",
    "teacher_precision": "--precision",
}


def differences(old: dict, new: dict, *, whole_folders: bool = False) -> list[str]:
    """Every difference between a store's identity (``old``) and this run's (``new``), the data's name first.
    ``whole_folders``: both were made from every file of an image folder (no --limit), so another sample count means
    the folder changed, not the option."""
    if not _feature_dtype_differs(old, new):
        old, new = ({k: v for k, v in d.items() if k != "feature_dtype"} for d in (old, new))
    out = []
    for key in _keys(old, new):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "dataset":
            out += _dataset(a or {}, b or {}, whole_folders)
        elif key == "teachers":
            out += _teachers(a or [], b or [])
        elif key == "features":  # other shapes follow from other teachers, named already
            out += _features(a or {}, b or {}, shapes=old.get("teachers") == new.get("teachers"))
        elif key == "logits":
            out.append(_option("logits", _logits_text(a), _logits_text(b)))
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [_option(f"{key}.{k}", a.get(k), b.get(k)) for k in _keys(a, b) if a.get(k) != b.get(k)]
        else:
            out.append(_option(key, a, b))
    return out


def _feature_dtype_differs(old: dict, new: dict) -> bool:
    """Whether the features' type is a difference of its own: not when no side stores features (it shapes nothing),
    nor when each side's is its --dtype (it follows --dtype, which is named by itself)."""
    if not old.get("features") and not new.get("features"):
        return False
    return any(d.get("feature_dtype") != d.get("dtype") for d in (old, new))


def _keys(a: dict, b: dict) -> list[str]:
    """The keys of both: the dataset first (a different dataset explains the rest), the teachers next, then sorted."""
    return sorted(set(a) | set(b), key=lambda k: ({"dataset": 0, "teachers": 1}.get(k, 2), k))


def _option(key: str, a, b) -> str:
    """'--dtype float16 in the store, float32 now' (a key no option sets: 'the store's KEY is A, this run's B')."""
    if key in OPTIONS:
        return f"{OPTIONS[key]} {_short(a)} in the store, {_short(b)} now"
    return f"the store's {key.replace('.', ' ').replace('_', ' ')} is {_short(a)}, this run's {_short(b)}"


def _dataset(a: dict, b: dict, whole_folders: bool = False) -> list[str]:
    """The name first; a different sample count says --limit (or, ``whole_folders``, that the folder changed) and
    implies the different fingerprint."""
    out = []
    if a.get("name") != b.get("name"):
        out.append(_option("dataset.name", a.get("name"), b.get("name")))
    if a.get("n") != b.get("n") and whole_folders:
        out.append(f"the store was started from the {plural(a.get('n') or 0, 'file')} the folder held then, it holds "
                   f"{b.get('n')} now: the folder changed since the store was started (restore it to finish the store)")
    elif a.get("n") != b.get("n"):
        out.append(f"the store caches {plural(a.get('n') or 0, 'sample')} (--limit {a.get('n')}), this run has "
                   f"{b.get('n')}")
    elif a.get("fingerprint") != b.get("fingerprint"):
        out.append(f"the training data differ (fingerprint {_hash(a.get('fingerprint'))} in the store, "
                   f"{_hash(b.get('fingerprint'))} now)")
    for key in sorted((set(a) | set(b)) - {"name", "n", "fingerprint"}):
        if a.get(key) != b.get(key):
            out.append(_option(f"dataset.{key}", a.get(key), b.get(key)))
    return out


def _teachers(a: list[dict], b: list[dict]) -> list[str]:
    """'teacher 1 is resnet8 (sha256 9d60c1...) in the store, resnet14 (bc0c...) now', or the counts if they differ."""
    if len(a) != len(b):
        return [f"the store has {plural(len(a), 'teacher')} ({', '.join(t['arch'] for t in a)}), this run "
                f"{len(b)} ({', '.join(t['arch'] for t in b)})"]
    return [f"teacher {i + 1} is {_teacher(x)} in the store, {_teacher(y)} now"
            for i, (x, y) in enumerate(zip(a, b)) if x != y]


def _teacher(t: dict) -> str:
    return f"{t['arch']} (sha256 {_hash(t['sha256'])})"


def _features(a: dict, b: dict, *, shapes: bool) -> list[str]:
    """Which layers one side stores and the other does not, with the -f options that made the store (``shapes``:
    also layers stored by both with other shapes)."""
    had = " ".join(f"-f {layout.layer_option(x)}" for x in sorted(a)) or "-f none"
    out = []
    for layer in sorted(set(a) | set(b)):
        if layer not in a:
            out.append(f"the store holds no {layer} features ({had}), this run asks for them")
        elif layer not in b:
            out.append(f"the store holds {layer} features ({had}), this run does not ask for them")
        elif shapes and a[layer] != b[layer]:
            out.append(f"the store's {layer} features have shapes {a[layer]['shapes']}, this run's "
                       f"{b[layer]['shapes']}")
    return out


def _logits_text(d: dict | None) -> str:
    """A logits identity as the options that make it: 'dense' or 'topk:10 (--kd-T 4)'."""
    if not d or d.get("kind") == "dense":
        return "dense"
    return f"topk:{d['k']} (--kd-T {' '.join(f'{t:g}' for t in d['kd_T'])})"


def _hash(h: str | None) -> str:
    return f"{h[:HASH_DIGITS]}..." if h else str(h)


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 70 else s[:67] + "..."
