"""The Pareto front of (cost, quality) points: what no other point beats on both.

In the report, cost is the suite's energy in joules (or its wall time when no
energy meter exists) and quality is mean recovery. A variant is worth
considering only if no other one is both cheaper-or-equal *and*
better-or-equal -- the front is that set.
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` costs no more and is worth no less than ``b``, and is strictly better in one of the two."""
    (ca, qa), (cb, qb) = a, b
    return ca <= cb and qa >= qb and (ca < cb or qa > qb)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) that no other point dominates, cheapest first.

    Lower cost and higher quality are better. Identical points dominate each
    other in neither direction, so both stay. Quadratic, which is fine: a
    report has a handful of models.

    Worked example: ``[(100, 1.0), (60, 0.95), (70, 0.90), (40, 0.70)]`` -> ``[3, 1, 0]``:
    (70, 0.90) is beaten by (60, 0.95), which is cheaper *and* better.
    """
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))
