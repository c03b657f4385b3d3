"""The forward-mode autograd plumbing the attention JVP kernels share (Triton-free; METHOD.md §6).

A kernel is a `launch(q, k, v, tq, tk, tv, bias, out, tout, scale)` that fills `out` (and `tout` when given) in
place: q / out / tq / tout [B, H, Lq, D], k / v / tk / tv [B, H, Lk, D], bias an additive fp32 key bias
[B, H, Lk] or None, tangents None where zero. `attention(launch, ...)` makes it an `F.scaled_dot_product_attention`
that `torch.func.jvp` and `torch.autograd.forward_ad` differentiate with one launch per call:

`torch.autograd.Function` runs `forward` on the primals and then, only when some input carries a tangent, `jvp`
with the tangents; `forward` never sees the tangents. So `forward` returns an unfilled output buffer and `jvp` fills
output and tangent in one launch. The buffer is shared through a per-call `_CallState`; when no jvp follows (a plain
call, or a call inside torch.func.jvp whose inputs carry no tangent) `attention` fills it with a primal-only launch
right after `apply` returns, so the primal is always right. Nested forward-mode AD (jvp of jvp) and vmap are
rejected loudly; reverse mode is not implemented (the sCM JVP runs under no_grad).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

Launch = Callable[..., None]


class _CallState:
    """What one `attention` call shares between forward, jvp and the primal fill-in."""

    __slots__ = ("launch", "inputs", "out", "filled")

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.inputs: tuple = ()
        self.out: torch.Tensor | None = None
        self.filled = False


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    # torch.func hands tangents to Function.jvp wrapped at its transform level; the kernel needs the storage.
    if t is None:
        return None
    functorch = torch._C._functorch
    if functorch.is_batchedtensor(t):
        raise NotImplementedError("attention JVP kernels have no vmap rule; call them outside torch.vmap.")
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def outside_functorch():
    """Kernel launches on plain tensors must not be seen as mutations of captured tensors by torch.func."""
    guard = getattr(torch._C, "_DisableFuncTorch", None)
    return guard() if guard is not None else contextlib.nullcontext()


def tangent_like(t: torch.Tensor | None, primal: torch.Tensor, name: str) -> torch.Tensor | None:
    """None and torch's ZeroTensor both mean "no tangent": the kernel then skips that term entirely."""
    if t is None or t._is_zerotensor():
        return None
    if t.shape != primal.shape:
        raise ValueError(f"tangent {name} has shape {tuple(t.shape)}, its primal {tuple(primal.shape)}.")
    return t.to(primal.dtype)


def key_bias_from_padding_mask(key_padding_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Bool key mask [B, Lk] (True = keep) -> additive fp32 logit bias [B, H, Lk] (0 or -inf), a view."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError("key_padding_mask must be a bool tensor [B, Lk] with True = attend.")
    bias = torch.zeros(key_padding_mask.shape, dtype=torch.float32, device=key_padding_mask.device)
    bias.masked_fill_(~key_padding_mask, float("-inf"))
    return bias[:, None, :].expand(-1, num_heads, -1)


def resolve_bias(q, k, key_padding_mask, key_bias) -> torch.Tensor | None:
    """One additive fp32 bias [B, H, Lk] (possibly a stride-0 broadcast view) or None."""
    B, H, _, _ = q.shape
    Lk = k.shape[2]
    if key_padding_mask is not None and key_bias is not None:
        raise ValueError("pass key_padding_mask or key_bias, not both.")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must be [B, Lk] = [{B}, {Lk}]; got {tuple(key_padding_mask.shape)}."
            )
        return key_bias_from_padding_mask(key_padding_mask, H)
    if key_bias is not None:
        return key_bias.to(torch.float32).expand(B, H, Lk)
    return None


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def launch_with_tangents(launch: Launch, q, k, v, tq, tk, tv, bias, scale: float) -> tuple[torch.Tensor, ...]:
    """(out, tangent_out) of one launch on plain tensors (no autograd involved)."""
    tq, tk, tv = (tangent_like(t, p, n) for t, p, n in ((tq, q, "tq"), (tk, k, "tk"), (tv, v, "tv")))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tout = torch.empty_like(out)
    launch(q, k, v, tq, tk, tv, bias, out, tout, scale)
    return out, tout


class _AttentionJVP(torch.autograd.Function):
    """Forward returns an unfilled buffer; jvp fills output and tangent in one launch (see the module doc)."""

    @staticmethod
    def forward(q, k, v, bias, scale, state):
        # q, v: [B, H, Lq | Lk, D]; bias: fp32 [B, H, Lk] or None. Plain tensors here, also under torch.func.
        state.inputs = (q, k, v, bias, scale)
        state.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return state.out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.state = inputs[-1]
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, so the kernel skips their products

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tbias, _tscale, _tstate):
        state = ctx.state
        if state.filled:
            raise NotImplementedError("attention JVP kernels support one level of forward-mode AD, not jvp of jvp.")
        q, k, v, bias, scale = state.inputs
        with outside_functorch():
            tq, tk, tv = (tangent_like(_plain(t), p, n) for t, p, n in ((tq, q, "tq"), (tk, k, "tk"), (tv, v, "tv")))
            tout = torch.empty_like(state.out)
            state.launch(q, k, v, tq, tk, tv, bias, state.out, tout, scale)
        state.filled = True
        return tout

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "attention JVP kernels implement forward-mode AD only (the sCM JVP pass under no_grad); "
            "use F.scaled_dot_product_attention for gradients."
        )


def attention(launch: Launch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> torch.Tensor:  # fmt: skip
    """softmax(scale q k^T + bias) v by `launch`, with its fused forward-mode derivative."""
    state = _CallState(launch)
    out = _AttentionJVP.apply(q, k, v, bias, scale, state)
    if not state.filled:  # no tangent reached this call: compute the primal into the buffer now
        q_, k_, v_, bias_, scale_ = state.inputs
        with outside_functorch():
            launch(q_, k_, v_, None, None, None, bias_, state.out, None, scale_)
        state.filled = True
    return out
