"""GPTQ: round one column at a time and let the columns not yet rounded absorb the error.

Rounding every weight to its nearest code (RTN) minimises the error of each
weight on its own, but what the model sees is the layer's *output* ``X W^T``.
When inputs are correlated, the error made on one column can be cancelled by
nudging the columns that have not been rounded yet. GPTQ (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") does exactly that, with the Hessian of the layer-wise squared
error, ``H = 2 X^T X / n``, standing for the calibration inputs.

Worked example (scale 1, so codes are plain integers). Two inputs that are
always equal, ``x1 = x2 = x``, and one output row ``w = [0.6, 0.6]``; the true
output is ``1.2 x``.

* RTN rounds both weights to 1: the output becomes ``2 x``, an error of ``0.8 x``.
* GPTQ rounds ``w1 = 0.6 -> 1`` (error ``-0.4``), then moves ``w2`` by the
  optimal compensation ``-(w1 - q1) * Hinv[0, 1] / Hinv[0, 0]``, which for
  ``H = [[1, 1], [1, 1]]`` (plus a little dampening) is ``-0.4``:
  ``w2 = 0.2 -> 0``. The output becomes ``1 x``, an error of ``0.2 x``.

How the loops nest (Alg. 1 of the paper), for ``block_size = B`` and group size ``G``::

    for each block of B columns [i1, i2):            # lazy batch (Sec. 3, "Step 2")
        for each column i in the block:
            if i starts a group: scales <- observer(current W[:, group])
            q_i   = round(W[:, i] / scale)
            Err1  = (W[:, i] - q_i * scale) / Hinv[i, i]
            W[:, i+1:i2] -= Err1 * Hinv[i, i+1:i2]     # within the block, now
        W[:, i2:] -= Err1_block @ Hinv[i1:i2, i2:]     # the rest, once per block

What ecoquant adds on top of the reference implementation:

* Scales come from the shared observer (:func:`~ecoquant.quantize.primitives.choose_qparams`,
  min-max or MSE) and codes from the shared :func:`~ecoquant.quantize.primitives.quantize`,
  in the weight's own dtype. With an identity Hessian nothing is propagated
  and GPTQ returns RTN's integers bit for bit, in fp32 and in bf16. For a bf16
  weight the returned scales are bf16 and the codes were rounded against those
  very bf16 scales, so the checkpoint's ``q * scale`` is the weight GPTQ
  measured its error against (error and updates stay in float32).
* Act-order uses *static groups*: all group scales are fixed up front from
  the original ``W`` in column order, then columns are processed by
  decreasing ``diag(H)``. Each column keeps its natural group, so the
  checkpoint needs no ``g_idx`` and stays Marlin-friendly.
* Columns that calibration never excited (``H[i, i] == 0``) are not zeroed (as
  the reference does): they are rounded to nearest and propagate nothing.
  A channel silent in text calibration may still fire on images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import (
    QuantizedWeight,
    check_group_size,
    choose_qparams,
)
from ecoquant.quantize.scheme import QuantScheme


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ runs (the quantization format itself is the :class:`QuantScheme`).

    Attributes:
        dampening_frac: added to ``diag(H)`` as a fraction of its mean, so that
            ``H`` is safely invertible when calibration inputs are (nearly)
            rank-deficient; 0.01 is the paper's value (Sec. 3, "Step 3").
        block_size: columns per lazy batch. It changes only speed and memory,
            not the result (up to float rounding).
        act_order: process columns by decreasing ``diag(H)`` (the "act-order"
            heuristic), so the columns with the largest inputs are rounded
            while many columns remain to absorb their error. On by default,
            as in llmcompressor (its "static" act-order): with static groups it
            costs nothing at inference, and on Gemma-3 270M it cut KL to bf16
            from 0.167 to 0.120 (bench/RESULTS.md).
        refine_steps: rounds of :func:`ecoquant.quantize.refine.refine` (code
            sweeps and scale solves against the same dampened Hessian) after
            GPTQ; 0 (the default) writes GPTQ's own result.
        scale_passes: with static groups (act-order), how many times GPTQ runs.
            Pass 1 takes its scales from the original ``W``; each later pass
            re-chooses them, by the same observer, from the values the pass
            before it actually rounded (``W`` after the error feedback), and
            the pass with the lowest layer error (dampened ``H``) is kept. Why: the
            feedback moves weights, and a clipping range searched on the
            original weights then clamps the moved ones (bench/RESULTS.md,
            issue 14: the hessian observer raised GPTQ's in-domain KL). Costs
            one more solve per pass; the forwards are unchanged.
    """

    dampening_frac: float = 0.01
    block_size: int = 128
    act_order: bool = True
    refine_steps: int = 0
    scale_passes: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.dampening_frac < 1.0:
            raise EcoquantError(
                f"GPTQ dampening_frac={self.dampening_frac} is invalid; use a value in (0, 1), e.g. 0.01"
            )
        if self.block_size < 1:
            raise EcoquantError(f"GPTQ block_size={self.block_size} is invalid; use a positive integer, e.g. 128")
        if not isinstance(self.act_order, bool):
            raise EcoquantError("GPTQ act_order must be True or False")
        if self.refine_steps < 0:
            raise EcoquantError(f"refine_steps={self.refine_steps} is invalid; use 0 (off) or a few, e.g. 4")
        if self.scale_passes < 1:
            raise EcoquantError(f"scale_passes={self.scale_passes} is invalid; use 1 (scales from W) or 2")


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = 2/n * sum x^T x``.

    ``x`` is ``[..., in]``; leading dims are flattened and every row (token)
    counts as one sample. The update is the reference's running average
    (rescale the old sum by ``n / (n + m)``, then add the new rows scaled by
    ``sqrt(2 / (n + m))``), so ``H`` stays an average of comparable magnitude
    however many batches arrive, in float32 on ``x``'s device.

    The reference counts sequences rather than tokens; that only rescales
    ``H``, and GPTQ's result does not depend on a positive scale of ``H``
    (dampening is relative to its mean diagonal). Counting tokens keeps
    batches of different lengths weighted correctly.

    Always float32, also when the forwards run in bfloat16: a bf16 matmul
    (3.6x float32's on 2 cores with bf16 instructions) rounds each batch's sum
    to 2^-9 of its entries, and on Gemma-3 270M that made the first layer's
    ``o_proj`` Hessian indefinite (smallest eigenvalue -0.83 against
    dampening 0.43; ``bench/solve_kernels.py``).

    ``H`` is updated in place (it is ``in x in`` floats, hundreds of MB for a
    wide layer) and returned with the new count; pass ``None, 0`` to start.
    """
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    elif H.shape != (x.shape[-1], x.shape[-1]):
        raise EcoquantError(
            f"input width {x.shape[-1]} does not match the Hessian {tuple(H.shape)}; "
            "accumulate one Hessian per Linear module"
        )
    if m == 0:
        return H, n
    H.mul_(n / (n + m))
    n += m
    x = x.to(device=H.device, dtype=torch.float32) * (2.0 / n) ** 0.5
    _add_gram(H, x)
    return H, n


#: Input widths from which :func:`_add_gram` computes only the lower block triangle.
_TRIANGLE_FROM = 1024
_TRIANGLE_BLOCK = 512


def _add_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += x^T x``, in place, computing the symmetric product once.

    Why: on a CPU this product is the costliest part of GPTQ after the layer
    forwards (on Gemma-3 270M as much time as the forwards of the layers it
    feeds, down_proj's ``2048 x 2048`` above all), and a plain ``addmm`` computes
    every entry twice. For wide inputs the lower block triangle is computed
    column block by column block (5/8 of the work for 4 blocks) and mirrored.
    Entries differ from a single ``addmm`` only by float summation order.
    """
    width = x.shape[1]
    if width < _TRIANGLE_FROM or x.shape[0] < _TRIANGLE_BLOCK:
        H.addmm_(x.t(), x)
        return
    bs = _TRIANGLE_BLOCK
    for j in range(0, width, bs):
        k = min(j + bs, width)
        H[j:, j:k].addmm_(x[:, j:].t(), x[:, j:k])
    for j in range(0, width, bs):
        k = min(j + bs, width)
        H[j:k, k:] = H[k:, j:k].t()


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: QuantScheme,
    cfg: GPTQConfig,
    static_qparams: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> QuantizedWeight:
    """Quantize one Linear weight ``W [out, in]`` against its input Hessian ``H [in, in]``.

    Returns codes in natural column order with scales ``[out, groups]`` in
    ``W``'s dtype (and int8 zero points when asymmetric). Neither ``W`` nor
    ``H`` is modified. Raises :class:`EcoquantError` when ``H`` is not
    positive definite even after dampening.

    ``static_qparams``: the scales (and zero points) the observer gives ``W``
    with importance ``diag(H)``, when the caller has them already (RTN's, for
    the recipe's baseline): static groups start from exactly these, so passing
    them only skips recomputing them (the hessian observer's search is
    seconds per wide Linear). Ignored with dynamic groups.
    """
    if W.dim() != 2:
        raise EcoquantError(f"GPTQ expects a 2-D Linear weight, got shape {tuple(W.shape)}")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise EcoquantError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    check_group_size("this layer", in_f, scheme)
    dtype = W.dtype
    gs = scheme.group_size
    # Each input's mean square on the calibration data: what the hessian observer weighs errors by.
    importance = torch.diag(H).to(device=W.device, dtype=torch.float32).clamp(min=0)
    # Group boundaries fixed up front (per channel, or act-order's static groups):
    # scales from the original W, exactly RTN's scales.
    static = gs is None or cfg.act_order
    scale = torch.empty(out_f, scheme.groups_for(in_f), dtype=dtype, device=W.device)
    zp = None if scheme.symmetric else torch.empty(scale.shape, dtype=torch.int8, device=W.device)
    if static:
        s0, z0 = static_qparams if static_qparams is not None else choose_qparams(W, scheme, importance)
        scale.copy_(s0)
        if zp is not None and z0 is not None:
            zp.copy_(z0)

    W = W.to(torch.float32).clone()
    H = H.to(device=W.device, dtype=torch.float32).clone()
    # Dead inputs: a zero diagonal would make H singular. A unit diagonal with
    # zero off-diagonals decouples the column: it is rounded to nearest and
    # its error reaches no other column.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    perm = torch.arange(in_f, device=W.device)
    if cfg.act_order:
        # The reference repo's act-order heuristic (Sec. 3, "Step 1" shows any order is valid);
        # ties keep column order so that an identity H changes nothing.
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    group_of = perm // gs if gs is not None else torch.zeros_like(perm)  # group of the i-th processed column

    passes = cfg.scale_passes if static else 1
    Hinv = _upper_inverse_factor(H, cfg.dampening_frac)
    del H  # only Hinv is needed from here on; for a wide layer it is hundreds of MB

    natural = torch.argsort(perm)  # processing order -> natural column order
    W0 = W.clone() if passes > 1 else W
    best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    R: torch.Tensor | None = None
    for p in range(passes):
        if p > 0 and R is not None:
            # Scales from what the previous pass rounded (natural column order), by the same observer.
            rounded = R[:, natural] if cfg.act_order else R
            s_p, z_p = choose_qparams(rounded.to(dtype), scheme, importance)
            scale = s_p.to(dtype)
            zp = None if z_p is None else z_p.to(torch.int8)
            W = W0.clone()  # W0 stays the original: every pass is judged against it
        Q, R, err = _column_loop(W, Hinv, scale, zp, group_of, static, scheme, cfg.block_size, importance, keep=p + 1 < passes)
        if passes > 1 and (best is None or err < best[0]):
            # The pass kept is the one with the lowest error under GPTQ's own (dampened) objective,
            # so a later pass can never make a Linear worse than pass 1 on it.
            best = (err, Q, scale, zp)
    if best is not None:
        _, Q, scale, zp = best

    if cfg.act_order:
        Q = Q[:, natural]
    return QuantizedWeight(q=Q, scale=scale, zero_point=zp)


def _column_loop(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    group_of: torch.Tensor,
    static: bool,
    scheme: QuantScheme,
    block_size: int,
    importance: torch.Tensor,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Alg. 1 over ``W`` (float32, in processing order; updated in place) with the given scales.

    Returns the codes in processing order; when ``keep``, the values each
    column had when it was rounded (what a later scale pass chooses from); and
    the layer objective ``tr(D H D^T)`` of the result, ``D = W - dequant(Q)``
    and ``H`` dampened. The objective comes free: rounding column i, given the
    optimal update of the later ones, raises it by exactly ``err_i^2``
    (``err = (w - q) / Hinv[i, i]``, the OBS step), so it is the sum of the
    squared errors the loop computes anyway (equal to the direct formula up to
    float rounding; tested against it).
    With dynamic groups (``not static``) it fills ``scale``/``zp`` as groups start.
    """
    out_f, in_f = W.shape
    dtype = scale.dtype
    gs = scheme.group_size
    group_scheme = replace(scheme, group_size=None) if gs is None else scheme
    Q = torch.zeros(out_f, in_f, dtype=torch.int8, device=W.device)
    R = torch.empty(out_f, in_f, dtype=torch.float32, device=W.device) if keep else None
    group_list = group_of.tolist()
    qmin, qmax = float(scheme.qmin), float(scheme.qmax)
    objective = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        if not static and gs is not None and i1 % gs == 0:
            # A group starts with this block: every earlier error has reached its columns.
            _group_scales(W, Hinv, i1, i2, i1, gs, scale, zp, group_scheme, dtype, importance, None)
        # The block transposed: column i of the block is the contiguous row i.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        cols = group_of[i1:i2]
        S1 = scale.t()[cols].contiguous()  # [count, out], the scale of each column's group, in dtype
        Z1 = None if zp is None else zp.t()[cols].to(dtype).contiguous()
        Q1 = torch.empty(count, out_f, dtype=dtype, device=W.device)
        for i in range(count):
            if not static and gs is not None and (i1 + i) % gs == 0 and i > 0:
                # A group starts inside this block: scales from its weights as updated so far.
                _group_scales(W, Hinv, i1, i2, i1 + i, gs, scale, zp, group_scheme, dtype, importance, (W1, Err1, i))
                g = group_list[i1 + i]
                S1[i:][cols[i:] == g] = scale[:, g]
                if Z1 is not None and zp is not None:
                    Z1[i:][cols[i:] == g] = zp[:, g].to(dtype)
            w = W1[i]
            # The primitives' quantize/dequantize, inlined on one column (same ops, same dtype: RTN's integers).
            x = w.to(dtype) / S1[i]
            if Z1 is not None:
                x = x + Z1[i]
            q = x.clamp_(qmin, qmax).round_()
            Q1[i] = q
            dq = ((q - Z1[i]) * S1[i] if Z1 is not None else q * S1[i]).to(torch.float32)
            # Alg. 1: the OBS update of the remaining columns in this block.
            err1 = (w - dq).div_(Hinv1[i, i])
            if i + 1 < count:
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err1, alpha=-1.0)
            Err1[i] = err1
        Q[:, i1:i2] = Q1.t().to(torch.int8)
        if R is not None:
            R[:, i1:i2] = W1.t()  # each column as it was when rounded (later updates never touch it)
        objective += torch.linalg.vector_norm(Err1).double().square()
        # Alg. 1, lazy batch: all of this block's errors reach the later columns at once.
        if i2 < in_f:
            W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1.0)

    return Q, R, float(objective)


def dampen_(H: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """``H += dampening_frac * mean(diag H) * I``, in place (and returned): the Hessian GPTQ's objective uses."""
    H.diagonal().add_(dampening_frac * torch.mean(torch.diag(H)))
    return H


def _upper_inverse_factor(H: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """Sec. 3, "Step 3": dampen ``H`` (in place), then the upper Cholesky factor of ``H^-1``.

    Its row i holds exactly the ``Hinv`` entries OBS needs once columns < i are gone.
    """
    dampen_(H, dampening_frac)
    L, info = torch.linalg.cholesky_ex(H)
    Hinv, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0 or info_inv.item() != 0 or not bool(torch.isfinite(Hinv).all()):
        raise EcoquantError(
            f"the Hessian of this layer is not positive definite even after dampening {dampening_frac}; "
            "raise the GPTQ dampening fraction (e.g. 0.1) or add calibration samples"
        )
    return Hinv


def _group_scales(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i2: int,
    col: int,
    gs: int,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    group_scheme: QuantScheme,
    dtype: torch.dtype,
    importance: torch.Tensor,
    block: tuple[torch.Tensor, torch.Tensor, int] | None,
) -> None:
    """Column order with groups: the scales of the group starting at ``col``, from its weights as updated so far.

    ``block`` is ``(W1, Err1, i)`` (the current block, transposed, and how many
    of its columns are done) when the group starts inside the block; columns
    past the block still lack its pending lazy update (Sec. 3, "Step 2"), so the
    part accrued so far is applied to them here.
    """
    end = min(col + gs, W.shape[1])
    if block is None:
        cur = W[:, col:end]
    else:
        W1, Err1, i = block
        cur = W1[i : min(end, i2) - i1].t()
        if end > i2:
            later = W[:, i2:end] - Err1[:i].t() @ Hinv[i1:col, i2:end]
            cur = torch.cat([cur, later], dim=1)
    s, z = choose_qparams(cur.to(dtype), group_scheme, importance[col:end])
    g = col // gs
    scale[:, g] = s[:, 0]
    if zp is not None and z is not None:
        zp[:, g] = z[:, 0]
