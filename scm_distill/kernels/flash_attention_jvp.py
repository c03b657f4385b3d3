"""Fused flash-attention JVP in Triton (METHOD.md §6; sCM, arXiv 2410.11081v2, App. F).

For one query row with logits x_j = scale q.k_j + b_j, p = softmax(x) and y = p V, the forward-mode
derivative along tangents (tQ, tK, tV) is

    t_x = scale (tQ K^T + Q tK^T),    t_y = (p * t_x) V - (p . t_x) y + p tV.

The kernel runs the online-softmax loop over key blocks and keeps, next to the running max m, the normaliser
l = sum_j e^{x_j - m} and acc = sum_j e^{x_j - m} v_j, two more accumulators rescaled by the same factor
e^{m_old - m_new}:

    mu   = sum_j e^{x_j - m} t_x_j                         (a row scalar)
    tacc = sum_j e^{x_j - m} (t_x_j v_j + tv_j)            (g and p tV share the normaliser: one tile)

and ends with y = acc / l, t_y = tacc / l - (mu / l) y. One pass over K, V, tK, tV; O(L) memory, no L x L
matrix. Products accumulate in fp32; the weights e and e t_x are rounded to the input dtype for the tensor
core products, as in flash attention. (Summing l and mu over the same rounded weights cut the bf16 tangent
error by a quarter but cost 15-18% of the kernel time on an H200; not worth it at ~1% relative error.)

Forward / jvp split. `torch.autograd.Function` runs `forward` on the primals and then, only when some input
carries a tangent, `jvp` with the tangents; `forward` never sees the tangents. Two designs fit:
  (a) forward = flash forward saving the logsumexp (Q K^T, P V: 2 matmul units); jvp = a tangent kernel that
      re-reads Q, K, V and recomputes Q K^T, tQ K^T, Q tK^T, (p t_x) V, p tV: 5 units, 7 in all, K and V read
      twice;
  (b) forward returns an unfilled output buffer; jvp fills output and tangent in the single pass above:
      6 units, K and V read once, no logsumexp round trip.
We use (b): about 15% fewer tensor-core FLOPs and one fewer sweep over K and V. The autograd.Function that
shares the buffer, and the forward-only launch when no jvp follows, are jvp_function.py's (the blocked CPU
path of blocked_attention_jvp.py uses the same).

Head dims up to 256 are supported; a dim that is not a power of two (8, 40, 80, 96, ...) is padded inside the
kernel to the next power of two (at least 16) by masking the extra columns on load and store - no copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .jvp_function import attention, default_scale, key_bias_from_padding_mask, launch_with_tangents, resolve_bias

__all__ = ["flash_attention", "flash_attention_jvp", "key_bias_from_padding_mask"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Zero-filled load of a [R, C] tile; a mask is compiled away when that side is known to be in bounds.
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Store of a [R, C] tile with the same mask rules as _load_tile.
    tile = tile.to(ptrs.dtype.element_ty)
    if MASK_ROWS and MASK_COLS:
        tl.store(ptrs, tile, mask=rows_ok[:, None] & cols_ok[None, :])
    elif MASK_ROWS:
        tl.store(ptrs, tile, mask=rows_ok[:, None])
    elif MASK_COLS:
        tl.store(ptrs, tile, mask=cols_ok[None, :])
    else:
        tl.store(ptrs, tile)


@triton.jit
def _tile_ptrs(base, off_b, off_h, rows, cols, stride_b, stride_h, stride_row, stride_col):
    # Pointers to the [len(rows), len(cols)] tile of a [B, H, L, D] tensor at (off_b, off_h).
    return (
        base + off_b * stride_b + off_h * stride_h + rows[:, None] * stride_row + cols[None, :] * stride_col
    )


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # acc + a @ b with fp32 accumulation; UPCAST is set under TRITON_INTERPRET, whose tl.dot mishandles bf16.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, BIAS, OUT, TOUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tqb, stride_tqh, stride_tqm, stride_tqd,
    stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    stride_bb, stride_bh, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tob, stride_toh, stride_tom, stride_tod,
    H, LQ, LK, D,
    scale, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_BIAS: tl.constexpr,
    WITH_TANGENT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M query rows of one (batch, head). Q/OUT: [B, H, LQ, D]; K/V: [B, H, LK, D];
    # BIAS: additive per-key logit bias [B, H, LK] (natural-log units); tensors absent by flag are never read.
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    HAS_TS: tl.constexpr = HAS_TQ or HAS_TK  # some logit tangent t_x is non-zero
    LOG2E: tl.constexpr = 1.4426950408889634

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d, stride_qb, stride_qh, stride_qm, stride_qd)
    q = _load_tile(q_ptrs, m_ok, d_ok, MASK_M, MASK_D)
    if HAS_TQ:
        tq_ptrs = _tile_ptrs(TQ, off_b, off_h, offs_m, offs_d, stride_tqb, stride_tqh, stride_tqm, stride_tqd)
        tq = _load_tile(tq_ptrs, m_ok, d_ok, MASK_M, MASK_D)
    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    tk_ptrs = _tile_ptrs(TK, off_b, off_h, offs_n, offs_d, stride_tkb, stride_tkh, stride_tkn, stride_tkd)
    tv_ptrs = _tile_ptrs(TV, off_b, off_h, offs_n, offs_d, stride_tvb, stride_tvh, stride_tvn, stride_tvd)
    b_ptrs = BIAS + off_b * stride_bb + off_h * stride_bh + offs_n * stride_bn

    # Running state, all fp32 and rescaled together by alpha = 2^(m_old - m_new) (base-2 logits x * log2 e).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # sum_j e_j,            e_j = 2^(x_j - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j e_j v_j
    mu_i = tl.zeros([BLOCK_M], tl.float32)  # sum_j e_j t_x_j
    tacc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j e_j (t_x_j v_j + tv_j)

    for start_n in range(0, LK, BLOCK_N):
        n_ok = (start_n + offs_n) < LK
        k = _load_tile(k_ptrs, n_ok, d_ok, MASK_N, MASK_D)
        v = _load_tile(v_ptrs, n_ok, d_ok, MASK_N, MASK_D)
        x = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION) * scale_log2
        if HAS_BIAS:
            if MASK_N:
                bias = tl.load(b_ptrs, mask=n_ok, other=float("-inf"))
            else:
                bias = tl.load(b_ptrs)
            x += bias[None, :] * LOG2E
        if MASK_N:
            x = tl.where(n_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no live key yet: keep e = 0, no NaN
        alpha = tl.exp2(m_i - m_ref)
        e = tl.exp2(x - m_ref[:, None])
        e_r = e.to(v.dtype)  # weights rounded to the input dtype for the tensor-core products
        l_i = l_i * alpha + tl.sum(e, 1)
        acc = _dot(e_r, v, acc * alpha[:, None], UPCAST, PRECISION)
        if WITH_TANGENT:
            mu_i = mu_i * alpha
            tacc = tacc * alpha[:, None]
            if HAS_TS:
                t_x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if HAS_TK:
                    tk = _load_tile(tk_ptrs, n_ok, d_ok, MASK_N, MASK_D)
                    t_x = _dot(q, tl.trans(tk), t_x, UPCAST, PRECISION)
                if HAS_TQ:
                    t_x = _dot(tq, tl.trans(k), t_x, UPCAST, PRECISION)
                e_t = e * (t_x * scale)  # e_j t_x_j, natural-log units as in the softmax derivative
                mu_i += tl.sum(e_t, 1)
                tacc = _dot(e_t.to(v.dtype), v, tacc, UPCAST, PRECISION)
            if HAS_TV:
                tv = _load_tile(tv_ptrs, n_ok, d_ok, MASK_N, MASK_D)
                tacc = _dot(e_r, tv, tacc, UPCAST, PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        tk_ptrs += BLOCK_N * stride_tkn
        tv_ptrs += BLOCK_N * stride_tvn
        b_ptrs += BLOCK_N * stride_bn

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)  # rows whose keys are all masked come out as zeros
    y = acc * inv_l[:, None]
    o_ptrs = _tile_ptrs(OUT, off_b, off_h, offs_m, offs_d, stride_ob, stride_oh, stride_om, stride_od)
    _store_tile(o_ptrs, y, m_ok, d_ok, MASK_M, MASK_D)
    if WITH_TANGENT:
        t_y = tacc * inv_l[:, None] - (mu_i * inv_l)[:, None] * y  # t_y = g/l + p tV - (mu/l) y
        to_ptrs = _tile_ptrs(
            TOUT, off_b, off_h, offs_m, offs_d, stride_tob, stride_toh, stride_tom, stride_tod
        )
        _store_tile(to_ptrs, t_y, m_ok, d_ok, MASK_M, MASK_D)


INTERPRET = type(_attention_jvp_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import time


# ------------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads


# Candidates per (bytes of one padded head row, with tangent), best first; the first that compiles within
# the chip's registers / shared memory is kept. A tangent launch holds twice the fp32 accumulators and also
# loads tK, tV. Ranked by `bench_attention.sweep_block_configs` at L4096 bf16 on an H100 and an H200 (D = 64,
# 128; D = 256 primal only: every 64 x 64 or 128-row tangent tile ran out of resources there, so the 512-byte
# tangent row is small and untimed); the 1024-byte rows (fp32 D = 256) are untuned guesses.
_CONFIGS: dict[tuple[int, bool], tuple[BlockConfig, ...]] = {
    (128, False): (BlockConfig(64, 64, 4, 3), BlockConfig(64, 64, 4, 2)),
    (256, False): (BlockConfig(128, 32, 8, 3), BlockConfig(64, 64, 4, 2)),
    (512, False): (BlockConfig(128, 32, 8, 3), BlockConfig(64, 64, 4, 3), BlockConfig(64, 32, 4, 1)),
    (1024, False): (BlockConfig(64, 32, 4, 1), BlockConfig(32, 32, 4, 1)),
    (128, True): (BlockConfig(64, 64, 4, 3), BlockConfig(64, 64, 4, 2)),
    (256, True): (BlockConfig(128, 32, 8, 3), BlockConfig(64, 32, 4, 3), BlockConfig(64, 32, 4, 1)),
    (512, True): (BlockConfig(64, 32, 4, 1), BlockConfig(32, 32, 4, 1), BlockConfig(16, 16, 4, 1)),
    (1024, True): (BlockConfig(64, 32, 8, 1), BlockConfig(32, 32, 4, 1), BlockConfig(16, 16, 4, 1)),
}
_INTERPRET_CONFIG = BlockConfig(16, 16, 1, 1)  # tiny tiles: several key blocks and ragged tails even in tests
_chosen_config: dict[tuple, BlockConfig] = {}  # compile cache: first candidate that fit, per specialisation


def padded_head_dim(D: int) -> int:
    """Head dim the kernel computes with: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(D))


def _candidates(block_d: int, dtype: torch.dtype, with_tangent: bool) -> tuple[BlockConfig, ...]:
    if INTERPRET:
        return (_INTERPRET_CONFIG,)
    row_bytes = min(1024, max(128, block_d * torch.finfo(dtype).bits // 8))
    return _CONFIGS[(row_bytes, with_tangent)]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (full fp32 by default); 16-bit inputs ignore this.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------------------
# Launcher on plain tensors
# ------------------------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return (0,) * ndim if t is None else tuple(t.stride())


def _kernel_flags(q, tq, tk, tv, bias, with_tangent: bool, block_d: int) -> dict:
    # Compile-time switches; a tangent that is None (zero) removes its loads and products from the kernel.
    return dict(
        HAS_TQ=with_tangent and tq is not None, HAS_TK=with_tangent and tk is not None,
        HAS_TV=with_tangent and tv is not None, HAS_BIAS=bias is not None, WITH_TANGENT=with_tangent,
        MASK_D=block_d != q.shape[3], UPCAST=INTERPRET and q.dtype != torch.float32,
        PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip


def _kernel_tensors(q, k, v, tq, tk, tv, bias, out, tout) -> tuple[list, tuple[int, ...]]:
    # The nine pointer arguments and their strides; an absent tensor gets zero strides.
    absent = q  # placeholder pointer for a tensor the kernel's flags keep it from reading
    present = [x if x is not None else absent for x in (tq, tk, tv, bias, tout)]
    tensors = [q, k, v, *present[:4], out, present[4]]
    strides = (*q.stride(), *k.stride(), *v.stride(), *_strides(tq, 4), *_strides(tk, 4), *_strides(tv, 4),
               *_strides(bias, 3), *out.stride(), *_strides(tout, 4))  # fmt: skip
    return tensors, strides


def _launch(q, k, v, tq, tk, tv, bias, out, tout, scale: float, config: BlockConfig | None = None) -> None:
    # Fills out (and tout when given) in place. q/out/tq/tout: [B, H, Lq, D]; k/v/tk/tv: [B, H, Lk, D];
    # bias: fp32 [B, H, Lk] or None; tangents may be None (zero). Without `config`, tries the candidates.
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_d = padded_head_dim(D)
    flags = _kernel_flags(q, tq, tk, tv, bias, tout is not None, block_d)
    tensors, strides = _kernel_tensors(q, k, v, tq, tk, tv, bias, out, tout)
    key = (q.device, q.dtype, block_d, tuple(sorted(flags.items())))
    if config is not None:
        candidates = (config,)
    elif key in _chosen_config:
        candidates = (_chosen_config[key],)
    else:
        candidates = _candidates(block_d, q.dtype, tout is not None)
    for i, cfg in enumerate(candidates):
        try:
            _attention_jvp_kernel[(triton.cdiv(Lq, cfg.block_m), B * H)](
                *tensors, *strides, H, Lq, Lk, D, scale, scale * _LOG2E,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                MASK_M=Lq % cfg.block_m != 0, MASK_N=Lk % cfg.block_n != 0, **flags,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        except OutOfResources:
            if i + 1 == len(candidates):
                raise
            continue
        if config is None:
            _chosen_config[key] = cfg
        return


# ------------------------------------------------------------------------------------------------------------
# Input checks and the direct (non-autograd) API
# ------------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not form one attention."
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[3]} is not supported (1..{MAX_HEAD_DIM}).")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device.")


def flash_attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its JVP in one fused pass (no autograd involved).

    Args:
        q: queries [B, H, Lq, D]; k, v: keys and values [B, H, Lk, D] (Lq != Lk allowed); fp16, bf16 or fp32,
            D <= 256, on CUDA (or CPU under TRITON_INTERPRET=1).
        tq, tk, tv: tangents shaped like q, k, v; None means zero.
        scale: logit scale, default 1/sqrt(D).
        key_padding_mask: optional bool [B, Lk], True = attend.
        key_bias: optional additive logit bias broadcastable to [B, H, Lk] (exclusive with key_padding_mask);
            treated as a constant.

    Returns:
        (out, tangent_out), both [B, H, Lq, D] in q's dtype; rows whose keys are all masked are zero.
    """
    _check_inputs(q, k, v)
    bias = resolve_bias(q, k, key_padding_mask, key_bias)
    return launch_with_tangents(_launch, q, k, v, tq, tk, tv, bias, default_scale(q, scale))


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale q k^T + bias) v with a fused forward-mode derivative (torch.func.jvp, forward_ad).

    Same arguments as `flash_attention_jvp` without the tangents; masks and biases are constants. Under
    torch.func.jvp the output and its tangent come from one kernel launch; called plainly it computes
    attention.
    Backward (reverse mode) is not implemented.
    """
    _check_inputs(q, k, v)
    # _launch looked up at call time, so that a wrapped launcher (the tests count launches) is the one called
    return attention(lambda *args: _launch(*args), q, k, v, resolve_bias(q, k, key_padding_mask, key_bias),
                     default_scale(q, scale))  # fmt: skip
