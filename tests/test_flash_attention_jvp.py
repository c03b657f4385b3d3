"""The attention JVP kernels (METHOD.md §6) - fused Triton, blocked CPU - and their dispatch, `scm_distill.attention`.

Reference everywhere: torch.func.jvp of softmax(scale q k^T + bias) v in float64. The blocked CPU kernel runs
in-process. The Triton kernel runs on CPU through Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is imported; so that the switch cannot leak into other test modules, every
interpreter case runs in ONE subprocess that runs this file as a script (see `_interpreter_main`) and prints a JSON
report; the parametrized tests read it. GPU tests (marker `gpu`) run in-process on CUDA and are skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scm_distill.attention import (
    fused_dispatch_active,
    fused_kernel_available,
    jvp,
    jvp_attention,
    key_bias_from_sdpa_mask,
)

REPO = Path(__file__).resolve().parents[1]
# Max |error| / max |reference| per input dtype (inputs are rounded to the dtype for the reference too).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------
# Shared helpers (used in-process and by the interpreter subprocess)
# ------------------------------------------------------------------------------------------------------------


def math_attention(q, k, v, scale=None, bias=None):
    # softmax(scale q k^T + bias) v; q: [B, H, Lq, D], k/v: [B, H, Lk, D], bias: broadcasts to [B, H, 1, Lk].
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1) @ v


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def random_problem(B, H, Lq, Lk, D, dtype, seed=0):
    # Primals and tangents rounded to dtype; returns (primals, tangents) as 3-tuples.
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)]
    primals = tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)
    tangents = tuple(torch.randn(s, generator=g).to(dtype) for s in shapes)
    return primals, tangents


def reference_jvp(primals, tangents, bias=None):
    # (y, t_y) in float64; None tangents are zero.
    p64 = tuple(p.double() for p in primals)
    t64 = tuple(torch.zeros_like(p) if t is None else t.double() for p, t in zip(p64, tangents, strict=True))
    b64 = None if bias is None else bias.double()
    return torch.func.jvp(lambda q, k, v: math_attention(q, k, v, bias=b64), p64, t64)


def tiny_unet(dtype=torch.float64):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, layers_per_block=1, attention_head_dim=8,
    )  # fmt: skip
    return model.to(dtype).eval()


def unet_problem(dtype):
    g = torch.Generator().manual_seed(1)
    x, tx = (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return x, tx, torch.tensor([10.0, 500.0], dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# Interpreter cases (run in the subprocess)
# ------------------------------------------------------------------------------------------------------------

# name -> (B, H, Lq, Lk, D, dtype, key padding mask, tangents present for (q, k, v))
KERNEL_CASES = {
    "self_L37_d32_fp32": (1, 2, 37, 37, 32, "fp32", False, (True, True, True)),
    "cross_Lq37_Lk50_d64_fp32": (1, 1, 37, 50, 64, "fp32", False, (True, True, True)),
    "cross_Lq20_Lk33_d128_fp32": (1, 1, 20, 33, 128, "fp32", False, (True, True, True)),
    "padded_d40_fp32": (1, 1, 37, 50, 40, "fp32", False, (True, True, True)),
    "cross_d32_bf16": (1, 2, 37, 50, 32, "bf16", False, (True, True, True)),
    "self_L50_d64_bf16": (1, 1, 50, 50, 64, "bf16", False, (True, True, True)),
    "cross_d32_fp16": (1, 1, 37, 50, 32, "fp16", False, (True, True, True)),
    "key_padding_mask_fp32": (2, 1, 37, 50, 32, "fp32", True, (True, True, True)),
    "key_padding_mask_bf16": (2, 1, 21, 37, 32, "bf16", True, (True, True, True)),
    "absent_tk_tv": (1, 1, 37, 50, 32, "fp32", False, (True, False, False)),
    "absent_tq": (1, 1, 37, 50, 32, "fp32", False, (False, True, True)),
}
# Cases through torch.func.jvp, a plain call, F.scaled_dot_product_attention routing and a diffusers UNet.
AUTOGRAD_CASES = (
    "func_jvp_cross_mask",
    "func_jvp_encoder_without_tangent",
    "plain_call",
    "sdpa_routed_float_mask",
    "sdpa_routed_bool_mask",
    "unet_fused_vs_math",
)


def _key_padding(B, Lk, seed=0):
    # Bool [B, Lk] with about a third of the keys masked and key 0 always kept (no fully masked row).
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Lk, generator=g) > 0.33
    keep[:, 0] = True
    return keep


def _bias_of(keep):
    # bool [B, Lk] -> float64 additive bias [B, 1, 1, Lk].
    bias = torch.zeros(keep.shape, dtype=torch.float64, device=keep.device).masked_fill(~keep, -math.inf)
    return bias[:, None, None, :]


def _run_kernel_case(kernels, B, H, Lq, Lk, D, dtype_name, masked, present):
    dtype = DTYPES[dtype_name]
    primals, tangents = random_problem(B, H, Lq, Lk, D, dtype)
    tangents = tuple(t if keep else None for t, keep in zip(tangents, present, strict=True))
    keep = _key_padding(B, Lk) if masked else None
    out, t_out = kernels.flash_attention_jvp(*primals, *tangents, key_padding_mask=keep)
    y, t_y = reference_jvp(primals, tangents, None if keep is None else _bias_of(keep))
    return relative_error(out, y), relative_error(t_out, t_y), TOLERANCE[dtype]


def _case_func_jvp_cross_mask(kernels):
    # torch.func.jvp through the autograd.Function: cross attention, key padding, tangents on q and v only.
    (q, k, v), (tq, _, tv) = random_problem(2, 2, 19, 45, 32, torch.float32, seed=3)
    keep = _key_padding(2, 45, seed=3)
    with torch.no_grad():
        out, t_out = torch.func.jvp(
            lambda q, v: kernels.flash_attention(q, k, v, key_padding_mask=keep), (q, v), (tq, tv)
        )
    y, t_y = reference_jvp((q, k, v), (tq, None, tv), _bias_of(keep))
    return relative_error(out, y), relative_error(t_out, t_y), TOLERANCE[torch.float32]


def _case_func_jvp_encoder_without_tangent(kernels):
    # Keys/values from an "encoder" that carries no tangent: only q is a jvp input.
    (q, k, v), (tq, _, _) = random_problem(1, 2, 33, 17, 64, torch.float32, seed=4)
    with torch.no_grad():
        out, t_out = torch.func.jvp(lambda q: kernels.flash_attention(q, k, v), (q,), (tq,))
    y, t_y = reference_jvp((q, k, v), (tq, None, None))
    return relative_error(out, y), relative_error(t_out, t_y), TOLERANCE[torch.float32]


def _case_plain_call(kernels):
    # No jvp at all: the forward-only kernel fills the primal.
    (q, k, v), _ = random_problem(1, 2, 29, 29, 32, torch.float32, seed=5)
    out = kernels.flash_attention(q, k, v)
    y = math_attention(q.double(), k.double(), v.double())
    return relative_error(out, y), 0.0, TOLERANCE[torch.float32]


def _case_sdpa_routed(kernels, bool_mask: bool):
    # F.scaled_dot_product_attention inside jvp_attention("fused") with the mask layouts diffusers builds:
    # AttnProcessor2_0 passes an additive float mask [B, H, 1, Lk]; the dispatcher passes bool [B, 1, 1, Lk].
    (q, k, v), (tq, tk, tv) = random_problem(2, 2, 23, 31, 32, torch.float32, seed=6)
    keep = _key_padding(2, 31, seed=6)
    bias = _bias_of(keep)
    mask = keep[:, None, None, :] if bool_mask else bias.float().expand(2, 2, 1, 31).clamp(min=-1e4)
    with torch.no_grad(), jvp_attention("fused"):
        assert fused_dispatch_active()
        out, t_out = torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                    (q, k, v), (tq, tk, tv))  # fmt: skip
    y, t_y = reference_jvp((q, k, v), (tq, tk, tv), mask.double() if not bool_mask else bias)
    return relative_error(out, y), relative_error(t_out, t_y), TOLERANCE[torch.float32]


def _case_unet_fused_vs_math(kernels):
    # The whole tiny UNet: fused kernel (interpreter) against MATH SDPA, fp32.
    model = tiny_unet(torch.float32)
    x, tx, t = unet_problem(torch.float32)
    f = lambda x: model(x, t).sample  # noqa: E731
    y_math, ty_math = jvp(f, (x,), (tx,), attention="math")
    y_fused, ty_fused = jvp(f, (x,), (tx,), attention="fused")
    return relative_error(y_fused, y_math.double()), relative_error(ty_fused, ty_math.double()), 1e-4


def _count_launches(kernels):
    # Wrap the kernel launcher to count real kernel calls (so the routed cases cannot pass by falling back).
    calls = {"tangent": 0, "primal": 0}
    launch = kernels._launch

    def counting_launch(*args, **kwargs):
        calls["tangent" if args[8] is not None else "primal"] += 1
        return launch(*args, **kwargs)

    kernels._launch = counting_launch
    return calls


def _interpreter_main() -> None:
    # Entry point of the subprocess: TRITON_INTERPRET=1 is already in the environment.
    from scm_distill.kernels import flash_attention_jvp as kernels

    assert kernels.INTERPRET, "the subprocess must run with TRITON_INTERPRET=1"
    calls = _count_launches(kernels)
    autograd = {
        "func_jvp_cross_mask": _case_func_jvp_cross_mask,
        "func_jvp_encoder_without_tangent": _case_func_jvp_encoder_without_tangent,
        "plain_call": _case_plain_call,
        "sdpa_routed_float_mask": lambda m: _case_sdpa_routed(m, bool_mask=False),
        "sdpa_routed_bool_mask": lambda m: _case_sdpa_routed(m, bool_mask=True),
        "unet_fused_vs_math": _case_unet_fused_vs_math,
    }
    report = {}
    for name, spec in KERNEL_CASES.items():
        report[name] = _run_kernel_case(kernels, *spec)
    for name, case in autograd.items():
        before = dict(calls)
        errors = case(kernels)
        report[name] = (*errors, {k: calls[k] - before[k] for k in calls})
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreter_report():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_math_jvp(interpreter_report, name):
    out_err, tangent_err, tol = interpreter_report[name]
    assert out_err <= tol, f"{name}: output error {out_err:.2e} > {tol:.0e}"
    assert tangent_err <= tol, f"{name}: tangent error {tangent_err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name", AUTOGRAD_CASES)
def test_autograd_and_routing_match_math(interpreter_report, name):
    out_err, tangent_err, tol, launches = interpreter_report[name]
    assert out_err <= tol and tangent_err <= tol, (
        f"{name}: errors {out_err:.2e}, {tangent_err:.2e} > {tol:.0e}"
    )
    expected = "primal" if name == "plain_call" else "tangent"
    assert launches[expected] >= 1, f"{name}: the fused kernel was not used ({launches})"
    if name != "plain_call":
        assert launches["primal"] == 0, f"{name}: the jvp took two launches per attention ({launches})"


# ------------------------------------------------------------------------------------------------------------
# In-process CPU tests: MATH dispatch, scoping, mask translation
# ------------------------------------------------------------------------------------------------------------


def test_math_mode_unet_jvp_matches_central_difference():
    pytest.importorskip("diffusers")
    model = tiny_unet(torch.float64)
    x, tx, t = unet_problem(torch.float64)
    f = lambda x: model(x, t).sample  # noqa: E731
    y, t_y = jvp(f, (x,), (tx,), attention="math")
    eps = 1e-6
    with torch.no_grad():
        t_fd = (f(x + eps * tx) - f(x - eps * tx)) / (2 * eps)  # central difference, O(eps^2) error
        assert torch.allclose(y, f(x), rtol=0, atol=1e-12)
    assert relative_error(t_y, t_fd) < 1e-6


def _fused_sdpa_flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled())  # fmt: skip


@pytest.mark.parametrize("mode", ["math", "auto"])
def test_context_is_scoped_and_fused_backends_stay_on_outside(mode):
    before = _fused_sdpa_flags()
    assert not fused_dispatch_active()
    with jvp_attention(mode):
        assert _fused_sdpa_flags() == (False, False, False)  # only MATH inside
        assert fused_dispatch_active() == (mode == "auto")  # CPU tensors take the blocked kernel, Triton or not
    assert _fused_sdpa_flags() == before
    assert not fused_dispatch_active()


def test_cpu_sdpa_has_no_forward_ad_outside_the_context():
    # The reason for the context (ECOSYSTEM.md): the default (fused) SDPA backends have no JVP rule.
    (q, k, v), (tq, tk, tv) = random_problem(1, 2, 8, 8, 16, torch.float32)
    with pytest.raises(NotImplementedError):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))
    with jvp_attention("math"):
        out, t_out = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))
    y, t_y = reference_jvp((q, k, v), (tq, tk, tv))
    assert relative_error(out, y) < 1e-5 and relative_error(t_out, t_y) < 1e-5


@pytest.fixture
def blocked_launches(monkeypatch):
    """Counts the blocked kernel's launches (so a routed case cannot pass by falling back to MATH)."""
    from scm_distill.kernels import blocked_attention_jvp as blocked

    calls = {"tangent": 0, "primal": 0}
    launch = blocked._launch

    def counting_launch(*args):
        calls["tangent" if args[8] is not None else "primal"] += 1
        return launch(*args)

    monkeypatch.setattr(blocked, "_launch", counting_launch)
    return calls


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_cpu_tensors_take_the_blocked_kernel_without_interpreter(mode, blocked_launches):
    # In this process TRITON_INTERPRET is not set, so CPU tensors take the blocked kernel, also when "fused" is forced.
    if not fused_kernel_available() and mode == "fused":
        pytest.skip("triton is not installed")
    from scm_distill.attention import _kernels

    if _kernels() is not None and _kernels().INTERPRET:
        pytest.skip("this process imported the kernels under TRITON_INTERPRET=1")
    (q, k, v), (tq, tk, tv) = random_problem(1, 2, 9, 7, 16, torch.float32)
    out, t_out = jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv), attention=mode)
    y, t_y = reference_jvp((q, k, v), (tq, tk, tv))
    assert relative_error(out, y) < 1e-5 and relative_error(t_out, t_y) < 1e-5
    assert blocked_launches == {"tangent": 1, "primal": 0}


def test_math_mode_and_the_compiled_jvp_keep_cpu_tensors_on_math(blocked_launches):
    (q, k, v), (tq, tk, tv) = random_problem(1, 2, 9, 7, 16, torch.float32)
    jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv), attention="math")
    with torch.no_grad(), jvp_attention("auto", blocked_cpu=False):  # as compiled_jvp.py enters it
        out, t_out = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))
    y, t_y = reference_jvp((q, k, v), (tq, tk, tv))
    assert relative_error(out, y) < 1e-5 and relative_error(t_out, t_y) < 1e-5
    assert blocked_launches == {"tangent": 0, "primal": 0}


# name -> (B, H, Lq, Lk, D, dtype, key padding mask, tangents present for (q, k, v)); BLOCK_ELEMENTS is set to 64
# logits, so every case runs several blocks of (batch x head) slices and of query rows, with ragged last blocks.
BLOCKED_CASES = {
    "self_L37_d32_fp32": (2, 3, 37, 37, 32, "fp32", False, (True, True, True)),
    "cross_Lq5_Lk9_fp32": (3, 2, 5, 9, 8, "fp32", False, (True, True, True)),
    "cross_Lq37_Lk50_bf16": (1, 2, 37, 50, 32, "bf16", False, (True, True, True)),
    "self_L21_fp16": (1, 2, 21, 21, 16, "fp16", False, (True, True, True)),
    "key_padding_mask_fp32": (2, 2, 19, 33, 16, "fp32", True, (True, True, True)),
    "absent_tk_tv": (1, 2, 17, 23, 16, "fp32", False, (True, False, False)),
    "absent_tq": (1, 2, 17, 23, 16, "fp32", False, (False, True, True)),
    "only_tv": (1, 2, 17, 23, 16, "fp32", False, (False, False, True)),
}


@pytest.mark.parametrize("name", list(BLOCKED_CASES))
def test_blocked_kernel_matches_math_jvp(name, monkeypatch):
    from scm_distill.kernels import blocked_attention_jvp as blocked

    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 64)
    B, H, Lq, Lk, D, dtype_name, masked, present = BLOCKED_CASES[name]
    dtype = DTYPES[dtype_name]
    primals, tangents = random_problem(B, H, Lq, Lk, D, dtype)
    tangents = tuple(t if keep else None for t, keep in zip(tangents, present, strict=True))
    keep = _key_padding(B, Lk) if masked else None
    bias = None if keep is None else _bias_of(keep)
    out, t_out = blocked.blocked_attention_jvp(*primals, *tangents, key_bias=None if bias is None else bias[:, :, 0])
    y, t_y = reference_jvp(primals, tangents, bias)
    assert out.dtype == dtype and t_out.dtype == dtype
    assert relative_error(out, y) <= TOLERANCE[dtype] and relative_error(t_out, t_y) <= TOLERANCE[dtype]


def test_blocked_kernel_gives_zero_for_fully_masked_rows_and_float64_exactly():
    # SDPA's MATH backend (its NaN-safe softmax) gives 0 for a query whose keys are all masked; so must the kernel.
    from scm_distill.kernels.blocked_attention_jvp import blocked_attention_jvp

    (q, k, v), (tq, tk, tv) = random_problem(2, 1, 6, 5, 8, torch.float64)
    bias = torch.zeros(2, 1, 5, dtype=torch.float64)
    bias[1] = -math.inf  # every key of the second sample masked
    out, t_out = blocked_attention_jvp(q, k, v, tq, tk, tv, key_bias=bias)
    assert out.dtype == torch.float64 and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(t_out[1], torch.zeros_like(t_out[1]))
    y, t_y = reference_jvp((q[:1], k[:1], v[:1]), (tq[:1], tk[:1], tv[:1]))
    assert relative_error(out[:1], y) < 1e-12 and relative_error(t_out[:1], t_y) < 1e-12


def test_blocked_routing_takes_masks_and_fills_primals_without_tangent(blocked_launches):
    # The dispatcher's bool key mask through SDPA; a second call whose keys and values (an encoder's) and query
    # carry no tangent runs one primal-only launch; the output equals plain attention.
    (q, k, v), (tq, tk, tv) = random_problem(2, 2, 23, 31, 32, torch.float32, seed=6)
    keep = _key_padding(2, 31, seed=6)
    mask = keep[:, None, None, :]

    def f(q, k, v):
        constant = F.scaled_dot_product_attention(q.detach() * 0 + 1, k.detach(), v.detach())  # no tangent
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), constant

    (out, constant), (t_out, t_constant) = jvp(f, (q, k, v), (tq, tk, tv), attention="auto")
    y, t_y = reference_jvp((q, k, v), (tq, tk, tv), _bias_of(keep))
    assert relative_error(out, y) < 1e-5 and relative_error(t_out, t_y) < 1e-5
    assert torch.allclose(constant, math_attention(torch.ones_like(q), k, v), atol=1e-6)
    assert torch.count_nonzero(t_constant) == 0
    assert blocked_launches == {"tangent": 1, "primal": 1}


def test_unet_jvp_through_the_blocked_kernel_equals_math(blocked_launches):
    pytest.importorskip("diffusers")
    model = tiny_unet(torch.float32)
    x, tx, t = unet_problem(torch.float32)
    f = lambda x: model(x, t).sample  # noqa: E731
    y_math, ty_math = jvp(f, (x,), (tx,), attention="math")
    y_auto, ty_auto = jvp(f, (x,), (tx,), attention="auto")
    assert relative_error(y_auto, y_math.double()) < 1e-5 and relative_error(ty_auto, ty_math.double()) < 1e-5
    assert blocked_launches["tangent"] >= 1


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="attention mode"):
        with jvp_attention("flash"):
            pass


def test_key_bias_from_sdpa_mask_accepts_key_padding_layouts_only():
    B, H, Lq, Lk = 2, 3, 5, 7
    keep = _key_padding(B, Lk)
    bias = key_bias_from_sdpa_mask(keep[:, None, None, :], (B, H, Lq, 4), Lk)
    assert bias.shape == (B, H, Lk) and bias.dtype == torch.float32
    assert torch.equal(bias[:, 1], _bias_of(keep)[:, 0, 0].float())
    additive = torch.randn(B, H, 1, Lk)
    assert torch.equal(key_bias_from_sdpa_mask(additive, (B, H, Lq, 4), Lk), additive[:, :, 0])
    assert key_bias_from_sdpa_mask(torch.zeros(Lk), (B, H, Lq, 4), Lk).shape == (B, H, Lk)
    assert (
        key_bias_from_sdpa_mask(torch.zeros(B, 1, Lq, Lk), (B, H, Lq, 4), Lk) is None
    )  # varies over queries
    assert key_bias_from_sdpa_mask(torch.zeros(B, 2, 1, Lk), (B, H, Lq, 4), Lk) is None  # head dim mismatch


def test_kernel_rejects_unsupported_inputs():
    pytest.importorskip("triton")
    from scm_distill.kernels.flash_attention_jvp import flash_attention_jvp

    (q, k, v), _ = random_problem(1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention_jvp(*(torch.zeros(1, 1, 4, 300) for _ in range(3)), None, None, None)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention_jvp(q.double(), k.double(), v.double(), None, None, None)
    with pytest.raises(ValueError, match="one attention"):
        flash_attention_jvp(q, k[:, :, :, :8], v, None, None, None)


# ------------------------------------------------------------------------------------------------------------
# GPU tests: larger shapes against MATH, the UNet through the dispatch, the benchmark harness
# ------------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_reference(primals, tangents, bias=None):
    # fp32 math on the GPU from the dtype-rounded inputs (float64 at L=4096 is needlessly slow).
    p32 = tuple(p.float() for p in primals)
    t32 = tuple(torch.zeros_like(p) if t is None else t.float() for p, t in zip(p32, tangents, strict=True))
    with torch.no_grad():
        return torch.func.jvp(lambda q, k, v: math_attention(q, k, v, bias=bias), p32, t32)


def _cuda_problem(B, H, Lq, Lk, D, dtype):
    primals, tangents = random_problem(B, H, Lq, Lk, D, dtype)
    return tuple(p.cuda() for p in primals), tuple(t.cuda() for t in tangents)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "L, D, dtype",
    [(1024, 64, "bf16"), (1024, 128, "fp16"), (1024, 96, "bf16"), (4096, 64, "bf16"), (4096, 128, "bf16"),
     (1024, 256, "bf16"), (1024, 64, "fp32")],
)  # fmt: skip
def test_gpu_kernel_matches_math(L, D, dtype):
    from scm_distill.kernels.flash_attention_jvp import flash_attention_jvp

    primals, tangents = _cuda_problem(2, 2, L, L, D, DTYPES[dtype])
    out, t_out = flash_attention_jvp(*primals, *tangents)
    y, t_y = _cuda_reference(primals, tangents)
    tol = TOLERANCE[DTYPES[dtype]] if dtype != "fp32" else 1e-4
    assert relative_error(out, y.double()) < tol and relative_error(t_out, t_y.double()) < tol


@pytest.mark.gpu
@cuda
def test_gpu_cross_attention_mask_and_absent_tangent_through_sdpa():
    primals, tangents = _cuda_problem(2, 4, 1024, 77, 64, torch.bfloat16)
    keep = _key_padding(2, 77).cuda()
    mask = keep[:, None, None, :]
    f = lambda q, v: F.scaled_dot_product_attention(q, primals[1], v, attn_mask=mask)  # noqa: E731
    out, t_out = jvp(f, (primals[0], primals[2]), (tangents[0], tangents[2]), attention="fused")
    y, t_y = _cuda_reference(primals, (tangents[0], None, tangents[2]), _bias_of(keep).float().cuda())
    tol = TOLERANCE[torch.bfloat16]
    assert relative_error(out, y.double()) < tol and relative_error(t_out, t_y.double()) < tol


@pytest.mark.gpu
@cuda
def test_gpu_unet_auto_matches_math():
    pytest.importorskip("diffusers")
    model = tiny_unet(torch.float32).cuda()
    x, tx, t = (z.cuda() for z in unet_problem(torch.float32))
    f = lambda x: model(x, t).sample  # noqa: E731
    _, ty_math = jvp(f, (x,), (tx,), attention="math")
    _, ty_auto = jvp(f, (x,), (tx,), attention="auto")
    assert relative_error(ty_auto, ty_math.double()) < 1e-4


@pytest.mark.gpu
@cuda
def test_gpu_benchmark_runs():
    from scm_distill.kernels.bench_attention import bench_attention_jvp

    result = bench_attention_jvp(B=1, H=2, L=512, D=64, repeats=3)
    assert result["fused_jvp_ms"] > 0 and result["sdpa_forward_ms"] > 0


if __name__ == "__main__":
    _interpreter_main()
