"""Attention JVP on CPU in torch, the logits in cache-sized blocks (METHOD.md §6; sCM, arXiv 2410.11081v2, App. F).

The same derivative as the Triton kernel (flash_attention_jvp.py): for one query row with logits
x_j = scale q.k_j + b_j, p = softmax(x) and y = p V, along tangents (tQ, tK, tV)

    t_x = scale (tQ K^T + Q tK^T),    t_y = (p * t_x) V - (p . t_x) y + p tV.

Here each block of (batch x head) slices and query rows holds its p and t_x explicitly, a few MiB (`BLOCK_ELEMENTS`
logits), so they stay in cache. torch.func.jvp of SDPA under its MATH backend materialises the logits of the whole
batch at once and runs a NaN-safe softmax over them: about 4x slower on 2 CPU cores (FLUX's 528 tokens, batch 16,
2 heads of 32: ~210 against ~50 ms per call), at B x H x Lq x Lk memory instead of a block's. Products accumulate
in float32 (float64 inputs in float64); outputs are in the inputs' dtype. Rows whose keys are all masked are zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .jvp_function import attention, default_scale, launch_with_tangents, resolve_bias

BLOCK_ELEMENTS = 2**19  # logits per block (2 MiB in float32): the fastest of 2^16..2^20 on 2 cores at 528 tokens


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(q, k, v, tq, tk, tv, bias, scale: float) -> tuple[Tensor, Tensor | None]:
    # One block: q [n, m, D], k / v [n, Lk, D], bias [n, 1, Lk] or None; tangents None where zero or not asked.
    logits = scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        logits = logits + bias
    peak = logits.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # fully masked rows: exp(-inf) = 0, not NaN
    weights = torch.exp(logits - peak)
    p = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    y = p @ v
    if tq is None and tk is None and tv is None:
        return y, None
    t_y = torch.zeros_like(y) if tv is None else p @ tv
    if tq is not None or tk is not None:
        t_x = torch.zeros_like(logits) if tq is None else tq @ k.transpose(-1, -2)
        if tk is not None:
            t_x = t_x + q @ tk.transpose(-1, -2)
        pt_x = p * (scale * t_x)
        t_y = t_y + pt_x @ v - pt_x.sum(-1, keepdim=True) * y
    return y, t_y


def _part(t: Tensor | None, index, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t[index].to(dtype)


def _launch(q, k, v, tq, tk, tv, bias, out, tout, scale: float) -> None:
    # jvp_function.py's launch contract: fills out (and tout when given) in place.
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dtype = _accumulation_dtype(q.dtype)
    flat = lambda t: None if t is None else t.reshape(B * H, t.shape[2], D)  # noqa: E731
    q, k, v, tq, tk, tv = map(flat, (q, k, v, tq, tk, tv))
    bias = None if bias is None else bias.reshape(B * H, 1, Lk)
    out, tout = (None if t is None else t.view(B * H, Lq, D) for t in (out, tout))
    if tout is None:
        tq = tk = tv = None
    rows = max(1, min(Lq, BLOCK_ELEMENTS // Lk))  # query rows per block
    slices = max(1, BLOCK_ELEMENTS // (rows * Lk))  # (batch x head) slices per block
    for i in range(0, B * H, slices):
        n = slice(i, i + slices)
        k_n, v_n, tk_n, tv_n = (_part(t, n, dtype) for t in (k, v, tk, tv))
        bias_n = None if bias is None else bias[n]
        for j in range(0, Lq, rows):
            nm = (n, slice(j, j + rows))
            y, t_y = _block(_part(q, nm, dtype), k_n, v_n, _part(tq, nm, dtype), tk_n, tv_n, bias_n, scale)
            out[nm] = y
            if tout is not None:
                tout[nm] = t_y


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form one attention "
                         f"[B, H, L, D].")  # fmt: skip
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")


def blocked_attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
                          *, scale: float | None = None, key_bias: Tensor | None = None,
                          ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Attention output and its JVP (no autograd involved): q [B, H, Lq, D], k / v [B, H, Lk, D], tangents shaped
    like them (None = zero), key_bias an additive logit bias broadcastable to [B, H, Lk]."""
    _check_inputs(q, k, v)
    bias = resolve_bias(q, k, None, key_bias)
    return launch_with_tangents(_launch, q, k, v, tq, tk, tv, bias, default_scale(q, scale))


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                      key_bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """softmax(scale q k^T + bias) v whose forward-mode derivative (torch.func.jvp) is the blocked one above;
    reverse mode is not implemented."""
    _check_inputs(q, k, v)
    # _launch looked up at call time, so that a wrapped launcher (the tests count launches) is the one called
    return attention(lambda *args: _launch(*args), q, k, v, resolve_bias(q, k, None, key_bias),
                     default_scale(q, scale))  # fmt: skip
