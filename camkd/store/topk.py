"""Top-k logits: what a store keeps instead of dense logits, and how a batch's teacher term is rebuilt.

Per (view, sample, teacher) a top-k store keeps the k largest logits and their class indices, and
exact float32 scalars computed from the teachers' float32 logits at cache time:

* ``ce``: the teacher's cross-entropy against the label at T = 1 (CA-MKD's weights, exact even when
  the label is outside the top k, which is where a teacher should be down-weighted);
* ``log_entropy``: the log of its entropy at T = 1 (EBKD's weights; a log so that one-hot-like
  teachers, whose entropies underflow float32, keep their ratios);
* per cached temperature T (``--kd-T``): ``lse`` = logsumexp(z / T) and ``log_tail`` = log of the
  probability mass at T outside the top k.

At a cached T the kept classes' log-probabilities ``z_c / T - lse`` are those of the dense store,
and the other classes form one tail bin of mass ``exp(log_tail)``; every KL of every method is
taken over the kept classes plus that bin (methods/functional.binned_kl).  The rebuilt dense
tensor spreads the tail mass evenly over the tail classes; only ``kd`` (which averages the
teachers' logits) and AEKD's gradient directions see how it is spread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from camkd.errors import CamkdError

FILL_FLOOR = -1.0e4  # log-probability floor of a tail class (a tail of mass 0 stays finite: no 0 * inf)
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # a store's dtype, as torch names it


@dataclass(frozen=True)
class LogitsSpec:
    """How a store keeps logits: ``dense`` (every class) or ``topk`` (k classes per teacher)."""

    kind: str = "dense"
    k: int = 0
    temperatures: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        if self.kind == "dense":
            return {"kind": "dense"}
        return {"kind": "topk", "k": self.k, "kd_T": list(self.temperatures)}

    @staticmethod
    def from_attrs(attrs: dict) -> LogitsSpec:
        d = attrs["logits"]
        if d["kind"] == "dense":
            return LogitsSpec()
        return LogitsSpec("topk", int(d["k"]), tuple(float(t) for t in d["kd_T"]))


DENSE = LogitsSpec()


def parse_logits(text: str, temperatures: list[float], num_classes: int | None = None) -> LogitsSpec:
    """``--logits dense`` or ``topk:K`` (with the ``--kd-T`` temperatures to cache) -> a checked spec."""
    text = (text or "dense").strip().lower()
    if text == "dense":
        return LogitsSpec()
    m = re.fullmatch(r"top-?k:(\d+)", text)
    if not m:
        raise CamkdError(f"--logits '{text}' is not understood; give dense or topk:K (e.g. topk:10)")
    k = int(m.group(1))
    if k < 1:
        raise CamkdError("--logits topk:K needs K >= 1")
    if num_classes is not None and k >= num_classes:
        raise CamkdError(f"--logits topk:{k} keeps every one of the {num_classes} classes; use --logits dense "
                         f"(or K < {num_classes})")
    temps = tuple(sorted({float(t) for t in temperatures}))
    if not temps or any(not math.isfinite(t) or t <= 0 for t in temps):
        raise CamkdError(f"--kd-T must be positive (each a temperature to distill at), got "
                         f"{', '.join(f'{t:g}' for t in temperatures) or 'none'}")
    return LogitsSpec("topk", k, temps)


def index_dtype(num_classes: int) -> type:
    """The smallest integer type that holds every class index."""
    return np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 32767 else np.int32


def shapes(spec: LogitsSpec, k_teachers: int) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (after [V, N]) of the topk/ arrays."""
    nt = len(spec.temperatures)
    return {"index": (k_teachers, spec.k), "values": (k_teachers, spec.k), "lse": (k_teachers, nt),
            "log_tail": (k_teachers, nt), "ce": (k_teachers,), "log_entropy": (k_teachers,)}


def dtypes(spec: LogitsSpec, num_classes: int, value_dtype) -> dict[str, type]:
    return {"index": index_dtype(num_classes), "values": value_dtype, "lse": np.float32, "log_tail": np.float32,
            "ce": np.float32, "log_entropy": np.float32}


def row_bytes(spec: LogitsSpec, k_teachers: int, num_classes: int, value_dtype) -> dict[str, int]:
    """Bytes per sample of each topk/ array."""
    dt = dtypes(spec, num_classes, value_dtype)
    return {name: int(np.prod(s)) * np.dtype(dt[name]).itemsize for name, s in shapes(spec, k_teachers).items()}


def teacher_entropies(teacher_logits: Tensor) -> Tensor:
    """[B, K] float64 entropies ``H = -sum_c p_c log p_c`` of ``softmax(z)`` at T = 1 (EBKD's, dense or top-k).

    From log-probabilities in float64, with the top class's ``log p = -log1p(S)``
    (``S`` = the other classes' mass relative to the top one) so that it is not
    rounded to 0: exact to float64 round-off for logit margins up to ~700, where
    float32 ``p * log p`` underflows beyond margins ~85 (and loses ~1/margin
    relatively from the top class's term well before that).
    """
    d = teacher_logits.double()
    d = d - d.amax(-1, keepdim=True)
    top = d.argmax(-1, keepdim=True)
    rest = d.scatter(-1, top, float("-inf")).exp().sum(-1, keepdim=True)  # S
    logp = d - torch.log1p(rest)
    return -(logp.exp() * logp).sum(-1)


def kept_classes(logits: Tensor, k: int, dtype: str) -> Tensor:
    """[B, K, k] indices of the k largest logits as a store of ``dtype`` holds them (rounded to it), largest first,
    ties in class order: the first kept class is a dense store's argmax (numpy's: the first maximal index)."""
    rounded = logits.detach().to(VALUE_DTYPES[dtype]).float()
    return torch.sort(rounded, dim=-1, descending=True, stable=True).indices[..., :k]


def compute(logits: Tensor, labels: Tensor, spec: LogitsSpec, dtype: str = "float32") -> dict[str, Tensor]:
    """A batch's top-k arrays from the teachers' logits [B, K, C] and the labels [B] (on their device).

    Scalars are computed in float64 and stored as float32; ``values`` are the logits themselves
    (the caller stores them in the store's ``dtype``, as a dense store would; the kept classes are ranked as
    stored, see :func:`kept_classes`).
    """
    z = logits.detach().double()
    B, K, C = z.shape
    index = kept_classes(logits, spec.k, dtype)
    values = logits.detach().float().gather(-1, index)
    kept = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, index, True)
    lse, log_tail = [], []
    for T in spec.temperatures:
        zt = z / T
        full = zt.logsumexp(-1)
        lse.append(full)
        log_tail.append(zt.masked_fill(kept, float("-inf")).logsumexp(-1) - full)
    log_p = z - z.logsumexp(-1, keepdim=True)  # T = 1
    ce = -log_p.gather(-1, labels.view(B, 1, 1).expand(B, K, 1).long()).squeeze(-1)
    ent = teacher_entropies(logits.detach())
    return {"index": index, "values": values, "lse": torch.stack(lse, -1).float(),
            "log_tail": torch.stack(log_tail, -1).float(), "ce": ce.float(), "log_entropy": ent.log().float()}


def rebuild(index: Tensor, values: Tensor, lse: Tensor, log_tail: Tensor, num_classes: int, T: float) -> tuple[Tensor, Tensor]:
    """(logits [B, K, C] = T x log-probabilities at T, kept [B, K, C] bool) of one batch.

    ``index``/``values`` [B, K, k]; ``lse``/``log_tail`` [B, K] at temperature T.  The kept classes get
    their exact log-probabilities; the tail's mass is spread evenly over the other classes (at least
    ``FILL_FLOOR``, so an empty tail stays finite).
    """
    index = index.long()
    k = index.shape[-1]
    fill = (log_tail - math.log(num_classes - k)).clamp_min(FILL_FLOOR)
    logp = fill.unsqueeze(-1).expand(*index.shape[:-1], num_classes).clone()
    logp.scatter_(-1, index, values.float() / T - lse.unsqueeze(-1))
    kept = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, index, True)
    return logp * T, kept


def tail_summary(log_tail: np.ndarray, temperatures: tuple[float, ...]) -> dict:
    """Per temperature and teacher: mean, 99th percentile and max of the tail mass over every (view, sample).

    ``log_tail`` [V, N, K, nT] float32.
    """
    q = np.exp(log_tail.astype(np.float64))
    out = {}
    for j, T in enumerate(temperatures):
        qt = q[..., j].reshape(-1, q.shape[2])
        out[f"{T:g}"] = {"mean": qt.mean(0).tolist(), "p99": np.percentile(qt, 99, axis=0).tolist(),
                         "max": qt.max(0).tolist()}
    return out


def temperature_index(spec: LogitsSpec, T: float, where: str) -> int:
    """Which cached temperature ``T`` is; a clear error when the store lacks it."""
    for j, t in enumerate(spec.temperatures):
        if math.isclose(t, T, rel_tol=0, abs_tol=1e-9):
            return j
    have = ", ".join(f"{t:g}" for t in spec.temperatures)
    raise CamkdError(f"{where} keeps top-{spec.k} logits for --kd-T {have} only, not {T:g}; distill with --kd-T {have.split(',')[0]} "
                     f"or re-cache with 'camkd cache-teachers ... --logits topk:{spec.k} --kd-T {T:g}'")
