"""The benchmarks' one statistic: per-seed paired differences, judged against the seeds' spread.

Two runs with the same seed share the student's initialization and sample order, so their
difference removes most of the seed-to-seed variation. A difference is called larger than the seed
spread when |mean| > 2 sd / sqrt(n) (two standard errors of the paired mean); the paired t statistic
and a two-sided 5 % t-test stand beside it (stricter for few seeds: |t| > 4.30 with 3).
"""

from __future__ import annotations

import math
import statistics

RULE = "|mean| > 2 sd / sqrt(n)"
# two-sided 5 % critical values of Student's t by degrees of freedom (n - 1); beyond the table, the normal's 1.96
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             15: 2.131, 20: 2.086, 30: 2.042}


def t_crit_95(df: int) -> float | None:
    """Two-sided 5 % critical t for ``df`` degrees of freedom (between table entries: the smaller df's, larger value);
    None without a degree of freedom."""
    if df < 1:
        return None
    return 1.96 if df > 30 else T_CRIT_95[max(k for k in T_CRIT_95 if k <= df)]


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b: their mean, sd (n - 1), the threshold 2 sd / sqrt(n) and whether |mean| exceeds
    it (``exceeds``), the paired t statistic and whether it passes a two-sided 5 % t-test (``t_test_95``).

    With one seed there is no spread: sd, threshold, t and t_crit_95 are None and nothing is judged.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)} runs")
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), statistics.mean(d)
    sd = statistics.stdev(d) if n > 1 else None
    threshold = 2 * sd / math.sqrt(n) if sd is not None else None
    t = mean / (sd / math.sqrt(n)) if sd else None
    crit = t_crit_95(n - 1)
    return {"diffs": d, "mean": mean, "sd": sd, "n": n, "threshold": threshold,
            "exceeds": threshold is not None and abs(mean) > threshold, "t": t, "t_crit_95": crit,
            "t_test_95": t is not None and abs(t) > crit}


def paired_text(p: dict | None) -> str:
    """``+0.36 +- 0.32``, marked ``(beyond spread)`` when the mean exceeds the rule; ``-`` for no comparison."""
    if not p:
        return "-"
    spread = "" if p["sd"] is None else f" +- {p['sd']:.2f}"
    return f"{p['mean']:+.2f}{spread}{' (beyond spread)' if p['exceeds'] else ''}"
