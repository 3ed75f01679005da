"""Refinement after GPTQ: descend on the layer's output error, inside the storage format.

GPTQ rounds each column once, in one pass, and never revisits a column after
the later ones moved; its result is good but not a minimum of the error it
measures. With ``H`` the (dampened) Hessian of the layer's calibration inputs,
the output error of a quantized weight ``Wq`` is the quadratic

    L(Wq) = tr((W - Wq) H (W - Wq)^T) = sum_rows d_r H d_r^T

and both of what the checkpoint stores can be improved against it exactly:

* **codes**, one input column at a time (coordinate descent): moving code
  ``q[r, j]`` by ``k`` steps of its scale ``s`` changes row ``r``'s error by
  ``-2 k s G[r, j] + k^2 s^2 H[j, j]`` with ``G = D H``, a parabola in ``k``;
  its best integer is the rounded vertex ``G[r, j] / (s H[j, j])``, clamped to
  the code range. Every accepted move lowers ``L``; ``G`` is kept current by a
  rank-one update of the rows that moved.
* **scales**, with the codes fixed: ``Wq_r = sum_g s_rg c_rg`` is linear in the
  row's group scales, so the best ones solve a ``groups x groups`` system per
  row. Rounded to the stored dtype, they are kept for a row only if its error
  went down and they stay positive.

One step is a sweep over all columns followed by a scale solve. The result is
the same format GPTQ writes (int codes, one scale per group, the same zero
points, no ``g_idx``), its error under ``H`` is never above the starting
point's, and this is a pure function of the weight, ``H`` and the start.

Why not learned rounding by gradient descent (AdaRound, AutoRound's SignRound):
on this quadratic the coordinate step is the exact minimiser along each code,
needs no learning rate and cannot make things worse; what it cannot see is the
non-linearity after the Linear (AutoRound tunes the whole block's output). That
trade keeps it at a few seconds per layer on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.gptq import dampen_
from ecoquant.quantize.primitives import QuantizedWeight, dequantize
from ecoquant.quantize.scheme import QuantScheme

#: Rows per chunk of the scale solve; bounds its ``rows x groups x in`` intermediate.
_SOLVE_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class RefineStats:
    """What refinement did to one weight (errors relative to ``tr(W H W^T)``)."""

    start_loss: float
    loss: float
    codes_changed: int
    rows_rescaled: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def dampened(H: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """``H + dampening_frac * mean(diag H) * I`` in float32: the objective GPTQ itself minimises."""
    return dampen_(H.to(torch.float32).clone(), dampening_frac)


def output_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``d_r H d_r^T`` with ``d = W - Wq`` (float32, ``[out]``)."""
    D = W.to(torch.float32) - Wq.to(torch.float32)
    return ((D @ H) * D).sum(dim=1)


def refine(
    W: torch.Tensor, H: torch.Tensor, start: QuantizedWeight, scheme: QuantScheme, steps: int
) -> tuple[QuantizedWeight, RefineStats]:
    """Lower ``tr((W - Wq) H (W - Wq)^T)`` from ``start`` by ``steps`` rounds of code sweeps and scale solves.

    Args:
        W: the float weight ``[out, in]`` the codes stand for.
        H: the input Hessian ``[in, in]``, dampened as GPTQ used it (:func:`dampened`).
        start: GPTQ's result (or any codes and scales in ``scheme``).
        scheme: the format; scales keep ``start.scale``'s dtype.
        steps: rounds; 0 returns ``start`` unchanged.

    Returns:
        The refined weight and its :class:`RefineStats`. Neither input is modified.
    """
    if steps < 0:
        raise EcoquantError(f"refine steps={steps} must be >= 0")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f) or start.q.shape != W.shape:
        raise EcoquantError(f"refine: weight {tuple(W.shape)}, Hessian {tuple(H.shape)} and codes "
                            f"{tuple(start.q.shape)} do not fit together")
    Hf = H.to(device=W.device, dtype=torch.float32)
    W32 = W.to(torch.float32)
    q = start.q.clone()
    scale = start.scale.clone()
    zp = start.zero_point
    gs = in_f if scheme.group_size is None else scheme.group_size

    def current() -> torch.Tensor:
        return dequantize(q, scale, zp, scheme).to(torch.float32)

    norm = float((W32 @ Hf * W32).sum()) or 1.0
    start_loss = float(output_loss(W32, current(), Hf).sum()) / norm
    changed = torch.zeros((), dtype=torch.int64)
    rescaled = torch.zeros(out_f, dtype=torch.bool, device=W.device)
    state = _State(W32, Hf, q, scale, zp, scheme, gs)
    for _ in range(steps):
        moved = _sweep_codes(state)
        changed += moved
        better = _solve_scales(state)
        rescaled |= better
        if moved == 0 and not bool(better.any()):
            break
    loss = float(output_loss(W32, current(), Hf).sum()) / norm
    stats = RefineStats(start_loss, loss, int(changed), int(rescaled.sum()))
    return QuantizedWeight(q=q, scale=scale, zero_point=zp), stats


@dataclass
class _State:
    """One refinement: the problem (``W``, ``H``, format) and the codes and scales being improved in place."""

    W: torch.Tensor
    H: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor | None
    scheme: QuantScheme
    gs: int


def _sweep_codes(st: _State) -> int:
    """One pass of exact coordinate descent over the codes, column by column (``q`` in place)."""
    W, H, q, scale, zp, scheme, gs = st.W, st.H, st.q, st.scale, st.zp, st.scheme, st.gs
    Wq = dequantize(q, scale, zp, scheme).to(torch.float32)
    G = (W - Wq) @ H  # [out, in]: half the gradient of each row's error
    s_all = scale.to(torch.float32)
    qf = q.to(torch.float32)
    lo, hi = float(scheme.qmin), float(scheme.qmax)
    diag = torch.diagonal(H)
    moved = 0
    for j in range(W.shape[1]):
        hjj = float(diag[j])
        if hjj <= 0.0:
            continue
        s = s_all[:, j // gs]
        qj = qf[:, j]
        k = (G[:, j] / (s * hjj)).round_()
        k = torch.minimum(torch.maximum(k, lo - qj), hi - qj)  # stay on the code range
        rows = k.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        kr = k[rows]
        qf[rows, j] += kr
        G[rows] -= (kr * s[rows]).unsqueeze(1) * H[j].unsqueeze(0)
        moved += rows.numel()
    q.copy_(qf.to(torch.int8))
    return moved


def _solve_scales(st: _State) -> torch.Tensor:
    """Best group scales for the current codes, row by row; kept where a row's error drops (``scale`` in place).

    Returns the bool ``[out]`` mask of rows whose scales changed.
    """
    W, H, q, scale, zp, scheme, gs = st.W, st.H, st.q, st.scale, st.zp, st.scheme, st.gs
    dtype = scale.dtype
    out_f, in_f = W.shape
    groups = in_f // gs
    old = output_loss(W, dequantize(q, scale, zp, scheme), H)
    codes = q.to(torch.float32)
    if zp is not None:
        codes = codes - zp.to(torch.float32).repeat_interleave(gs, dim=1)
    Hg = H.reshape(groups, gs, in_f)
    chunk = max(1, _SOLVE_ELEMENTS // (groups * in_f))
    new = torch.empty(out_f, groups, dtype=torch.float32, device=W.device)
    for r0 in range(0, out_f, chunk):
        C = codes[r0 : r0 + chunk].reshape(-1, groups, gs)
        P = torch.einsum("rgi,gij->rgj", C, Hg)  # [rows, groups, in]: sum over group g of c_i H[i, :]
        A = torch.einsum("rghl,rhl->rgh", P.reshape(-1, groups, groups, gs), C)
        b = torch.einsum("rgj,rj->rg", P, W[r0 : r0 + chunk])
        ridge = 1e-7 * A.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        A.diagonal(dim1=1, dim2=2).add_(ridge.unsqueeze(1))
        new[r0 : r0 + chunk] = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
    # A group whose codes are all zero has no say in the error: keep its scale.
    silent = (codes.reshape(out_f, groups, gs) == 0).all(dim=-1)
    cand = torch.where(silent, scale, new.to(dtype))
    ok = torch.isfinite(new).all(dim=1) & (cand > 0).all(dim=1)
    loss = output_loss(W, dequantize(q, cand, zp, scheme), H)
    better = ok & (loss < old)
    scale[better] = cand[better]
    return better
