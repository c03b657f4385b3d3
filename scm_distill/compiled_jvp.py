"""`torch.compile` of the sCD tangent pass: the student's F and its forward-mode derivative as one graph.

`objective.compile_jvp: true` runs (F, dF) = torch.func.jvp(F, (x_t, t), (v_x, v_t)) through `torch.compile`
with the JVP inside the compiled function (torch.func transforms must be inside, never around, the compiled
region). One workaround is needed: with torch 2.14, tracing the JVP of the native group_norm kernel trips an
internal assert (`_fw_primal` under fake tensors; the class of pytorch/pytorch#197090), after which Dynamo falls
back to eager for the whole frame. Inside the compiled function GroupNorm is therefore written out as its
definition (mean and variance per group), which traces; nothing changes outside it.

Attention stays as `attention.jvp_attention` sets it up (entered outside the compiled function). With MATH
attention (CPU, or `objective.attention: math`) the whole JVP is one graph. Calls routed to the fused Triton kernel
(an autograd.Function with a forward-mode rule) are not captured: under TRITON_INTERPRET=1 Dynamo returns a
trivial graph and the JVP runs eagerly - the same result, without the gain. Shapes that change (a last, smaller
batch) recompile once and are then cached by Dynamo.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .attention import AttentionMode, jvp_attention

_GROUP_NORM = F.group_norm


# GroupNorm by its definition: (x - mean) / sqrt(var + eps) over each group of channels (biased variance), then the
# per-channel affine map; x: [B, C, ...].
def group_norm_by_definition(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                             eps: float = 1e-5) -> Tensor:  # fmt: skip
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(dim=-1, keepdim=True)
    var = (groups - mean).square().mean(dim=-1, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    channel = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(channel)
    if bias is not None:
        y = y + bias.reshape(channel)
    return y


class _GroupNormByDefinition(TorchFunctionMode):
    """Routes F.group_norm to `group_norm_by_definition`; every other call passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _GROUP_NORM:
            return group_norm_by_definition(*args, **kwargs)
        return func(*args, **kwargs)


def _jvp_of_F(model, x: Tensor, t: Tensor, v_x: Tensor, v_t: Tensor, condition: dict) -> tuple[Tensor, Tensor]:
    # (F(x, t), dF along (v_x, v_t)) for a module with an F(x, t, condition) method (Student or NativeModel).
    with _GroupNormByDefinition():
        return torch.func.jvp(lambda a, b: model.F(a, b, condition), (x, t), (v_x, v_t))


@functools.cache
def _compiled(backend: str):
    return torch.compile(_jvp_of_F, backend=backend)


def compiled_jvp_of_F(model, x: Tensor, t: Tensor, v_x: Tensor, v_t: Tensor, condition: dict,
                      attention: AttentionMode = "auto", backend="inductor") -> tuple[Tensor, Tensor]:  # fmt: skip
    """(F, dF) of `model.F(x, t, condition)` along (v_x, v_t), under no_grad, compiled with `backend`.

    Args:
        model: the unwrapped student (or any module with an `F(x, t, condition)` method).
        attention: how attention is differentiated, see `attention.jvp_attention`.
        backend: a torch.compile backend, by name or callable ("inductor" generates kernels; "aot_eager" only
            traces).
    """
    with torch.no_grad(), jvp_attention(attention, blocked_cpu=False):  # CPU on MATH: one graph
        return _compiled(backend)(model, x, t, v_x, v_t, condition)
