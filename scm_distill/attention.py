"""JVP-safe attention for the sCM tangent pass (METHOD.md §6; arXiv 2410.11081v2, §5.1 and App. F).

PyTorch's fused SDPA kernels (flash, memory-efficient, cuDNN, CPU flash) have no forward-mode derivative,
so `torch.func.jvp` through a teacher fails with them; only the MATH backend works, at O(L^2) memory. Enter
`jvp_attention(...)` around the JVP call only - the gradient forward/backward keeps the fused kernels:

    "math"  : SDPA restricted to SDPBackend.MATH; diffusers' dispatcher set to "_native_math".
    "fused" : every F.scaled_dot_product_attention call in the context is routed through a TorchFunctionMode
              scoped to the context (no monkeypatching): CUDA tensors to the Triton flash-attention JVP kernel
              (scm_distill.kernels.flash_attention_jvp), CPU tensors to the blocked torch JVP
              (scm_distill.kernels.blocked_attention_jvp, ~4x faster than MATH on 2 cores at 528 tokens);
              diffusers' dispatcher is set to "native" so that its models call SDPA. Calls neither can express
              (dropout, causal, a mask that varies over queries, GQA, a mask with a tangent, unsupported dtype /
              head dim, other devices) run SDPA under MATH instead. CPU tensors take the Triton kernel instead
              when TRITON_INTERPRET=1 was set before the kernel module was imported (tests). Raises without Triton.
    "auto"  : the same routing; CUDA tensors take MATH where Triton is not importable.

The compiled JVP (compiled_jvp.py) keeps CPU tensors on MATH (`blocked_cpu=False`), which Dynamo captures in one
graph; the routed kernels are autograd.Functions it does not. Models whose attention processor was pinned to another
diffusers backend (`set_attention_backend("flash")`) bypass the context's dispatcher setting; the bmm + softmax
`AttnProcessor` is JVP-safe as it is. The mode adds one Python call per torch function inside the context (it must
see each one to find SDPA).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.forward_ad import unpack_dual
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .errors import UserError
from .kernels.blocked_attention_jvp import blocked_attention

AttentionMode = Literal["auto", "fused", "math"]
ATTENTION_MODES: tuple[str, ...] = ("auto", "fused", "math")

_SDPA = F.scaled_dot_product_attention


@functools.cache
def _kernels():
    # The Triton module, or None where triton is not installed (CPU-only machines without it).
    try:
        from scm_distill.kernels import flash_attention_jvp
    except ImportError:
        return None
    return flash_attention_jvp


def fused_kernel_available() -> bool:
    """True when the Triton kernel imports (it still runs only on CUDA or under TRITON_INTERPRET=1)."""
    return _kernels() is not None


# ------------------------------------------------------------------------------------------------------------
# Translating one SDPA call to the kernel's arguments
# ------------------------------------------------------------------------------------------------------------


def _has_tangent(t: torch.Tensor) -> bool:
    return unpack_dual(t).tangent is not None


def key_bias_from_sdpa_mask(attn_mask: torch.Tensor | None, q_shape, Lk: int) -> torch.Tensor | None:
    """SDPA attn_mask -> additive fp32 key bias [B, H, Lk], or None when the kernel cannot express it.

    Accepts masks broadcastable to [B, H, Lq, Lk] whose query dim is 1 (key padding, as diffusers builds
    them): bool (True = attend) or additive float.
    """
    B, H, _, _ = q_shape
    if attn_mask is None or attn_mask.dim() > 4:
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[2] != 1 or shape[3] != Lk or shape[0] not in (1, B) or shape[1] not in (1, H):
        return None
    mask = attn_mask.reshape(shape)[:, :, 0, :]  # [1|B, 1|H, Lk]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -math.inf)
    else:
        bias = mask.to(torch.float32)
    return bias.expand(B, H, Lk)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):  # fmt: skip
    # SDPA's signature, so positional and keyword calls both bind.
    return query, key, value, attn_mask, dropout_p, is_causal, scale


def _kernel_for(q: torch.Tensor, kernels, force: bool, blocked_cpu: bool):
    # The JVP kernel this call's device takes: "triton", "blocked" or None (SDPA under MATH).
    if kernels is not None and (q.is_cuda or (force and kernels.INTERPRET and q.device.type == "cpu")):
        return "triton"
    if blocked_cpu and q.device.type == "cpu":
        return "blocked"
    return None


def _fused_sdpa(kernels, force: bool, blocked_cpu: bool, args: tuple, kwargs: dict) -> torch.Tensor | None:
    # The routed kernel's output for this SDPA call, or None when the call must run as SDPA (MATH) instead.
    try:
        q, k, v, attn_mask, dropout_p, is_causal, scale = _sdpa_arguments(*args, **kwargs)
    except TypeError:  # an argument this routing does not know: leave the call to SDPA
        return None
    kernel = _kernel_for(q, kernels, force, blocked_cpu)
    if kernel is None or dropout_p != 0.0 or is_causal:
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        return None
    if q.shape[3] != k.shape[3] or k.dtype != q.dtype or v.dtype != q.dtype or not q.is_floating_point():
        return None
    if kernel == "triton" and (q.shape[3] > kernels.MAX_HEAD_DIM or q.dtype not in kernels.SUPPORTED_DTYPES):
        return None
    bias = None
    if attn_mask is not None:
        bias = key_bias_from_sdpa_mask(attn_mask, q.shape, k.shape[2])
        if bias is None or (attn_mask.is_floating_point() and _has_tangent(attn_mask)):
            return None
    if kernel == "triton":
        return kernels.flash_attention(q, k, v, scale=scale, key_bias=bias)
    return blocked_attention(q, k, v, scale=scale, key_bias=bias)


class _FusedAttentionJVPMode(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to the JVP kernels; every other call passes through."""

    def __init__(self, kernels, force: bool, blocked_cpu: bool) -> None:
        super().__init__()
        self.kernels = kernels  # the Triton module, or None
        self.force = force  # "fused" was asked for explicitly (allows the CPU interpreter)
        self.blocked_cpu = blocked_cpu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            out = _fused_sdpa(self.kernels, self.force, self.blocked_cpu, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def fused_dispatch_active() -> bool:
    """True inside `jvp_attention("fused" | "auto")` where SDPA calls are being routed to the kernel."""
    stack = torch.overrides._get_current_function_mode_stack()
    return any(isinstance(mode, _FusedAttentionJVPMode) for mode in stack)


# ------------------------------------------------------------------------------------------------------------
# The context manager and the jvp helper
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def _diffusers_attention_backend():
    # diffusers' dispatcher context (diffusers 0.32+), or None; cached: a failed import is slow to repeat.
    try:
        from diffusers.models.attention_dispatch import attention_backend
    except ImportError:
        return None
    return attention_backend


def _diffusers_backend(name: str):
    # Sets the backend of diffusers' attention dispatcher for the context; absent diffusers, nothing to set.
    attention_backend = _diffusers_attention_backend()
    return contextlib.nullcontext() if attention_backend is None else attention_backend(name)


@contextlib.contextmanager
def jvp_attention(mode: AttentionMode = "auto", *, blocked_cpu: bool = True) -> Iterator[None]:
    """Make attention forward-mode differentiable inside the block; enter it around the JVP call only.

    Args:
        mode: "math" (SDPA MATH backend everywhere), "fused" (the Triton kernel for CUDA tensors, the blocked
            kernel for CPU tensors, MATH for the rest; raises if Triton is missing) or "auto" (the same, CUDA
            tensors on MATH where Triton is not importable). See the module docstring for the exact routing.
        blocked_cpu: route CPU tensors to the blocked kernel (False: MATH, as the compiled JVP needs).
    """
    if mode not in ATTENTION_MODES:
        raise UserError(f"attention mode must be one of {ATTENTION_MODES}; got {mode!r}.")
    kernels = None if mode == "math" else _kernels()
    if mode == "fused" and kernels is None:
        raise RuntimeError('jvp_attention("fused") needs triton; install it or use mode="auto" / "math".')
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))  # fallbacks and non-routed calls stay JVP-safe
        if mode == "math" or (kernels is None and not blocked_cpu):
            stack.enter_context(_diffusers_backend("_native_math"))
        else:
            stack.enter_context(_diffusers_backend("native"))  # its native backend calls SDPA, which we route
            stack.enter_context(_FusedAttentionJVPMode(kernels, force=mode == "fused", blocked_cpu=blocked_cpu))
        yield


def jvp(
    fn: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    attention: AttentionMode = "auto",
) -> tuple[Any, Any]:
    """`torch.func.jvp(fn, primals, tangents)` under no_grad with JVP-safe attention: (output, tangent).

    Args:
        fn: the function to differentiate (e.g. the teacher or the EMA student; not a DDP wrapper).
        primals, tangents: tuples of tensors (or pytrees), as for torch.func.jvp.
        attention: how attention is differentiated, see `jvp_attention`.
    """
    load_jvp_decompositions()
    with torch.no_grad(), jvp_attention(attention):
        return torch.func.jvp(fn, primals, tangents)


@functools.cache
def load_jvp_decompositions() -> None:
    """Import the TorchScript decompositions forward-mode AD loads on its first `make_dual`, without its warning.

    torch (2.14) imports `torch._decomp.decompositions_for_jvp` on the first dual tensor, which calls
    `torch.jit.script` and so prints "`torch.jit.script` is deprecated" (FutureWarning) into our progress bars; the
    call is torch's own, not ours. Importing the module once here with exactly that warning silenced makes the later
    import a no-op; every other warning (and this one from any other torch.jit.script call) still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401
