"""objective.compile_jvp: the compiled tangent pass is one graph and equals the eager torch.func.jvp."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet
from diffusers import DDPMScheduler
from torch._dynamo.testing import CompileCounterWithBackend

from scm_distill.compiled_jvp import compiled_jvp_of_F, group_norm_by_definition
from scm_distill.config import resolve
from scm_distill.families.unet2d import UNet2DTeacher
from scm_distill.families.vp import scheduler_config
from scm_distill.objective import SCDConfig, SCDLoss
from scm_distill.student import student_from_teacher
from scm_distill.trigflow import expand_as


@pytest.mark.parametrize("shape, groups, affine", [((2, 8, 5, 3), 4, True), ((3, 6, 7), 2, False),
                                                   ((1, 4, 2, 3, 2), 4, True)])  # fmt: skip
def test_group_norm_by_definition_equals_torch(shape, groups, affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    torch.testing.assert_close(group_norm_by_definition(x, groups, weight, bias, eps=1e-6),
                               F.group_norm(x, groups, weight, bias, eps=1e-6))  # fmt: skip


def tiny_case(dtype):
    scheduler = DDPMScheduler(prediction_type="epsilon")
    teacher = UNet2DTeacher(tiny_unet(0).to(dtype), scheduler_config(scheduler), "tiny", None, 0.5)
    student = student_from_teacher(teacher.model).to(dtype)
    with torch.no_grad():  # make the student differ from the teacher
        for p in student.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=dtype)
    with torch.no_grad():
        dxdt = teacher.model.velocity(x_t, t)
    cs = torch.cos(t) * torch.sin(t)
    return teacher, student, x_t, t, expand_as(cs, x_t) * dxdt, cs


def test_compiled_jvp_is_one_graph_and_equals_eager():
    """Through a UNet2DModel (GroupNorm, self-attention, sinusoidal time embedding): Dynamo captures the whole
    JVP as one frame (no fallback to eager), and its (F, dF) equal torch.func.jvp's in float64."""
    teacher, student, x_t, t, v_x, v_t = tiny_case(torch.float64)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    F_c, dF_c = compiled_jvp_of_F(student, x_t, t, v_x, v_t, {}, attention="math", backend=counter)
    F_e, dF_e = SCDLoss(teacher.model, SCDConfig(attention="math"))._jvp(student, x_t, t, {}, v_x, v_t)
    assert counter.frame_count == 1
    torch.testing.assert_close(F_c, F_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dF_c, dF_e, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="Inductor's CPU code generation needs a C++ compiler")  # fmt: skip
def test_scd_loss_with_inductor_compiled_jvp_equals_eager():
    """The option as training uses it: SCDLoss(compile_jvp=True) with Inductor's generated code, float32."""
    teacher, student, x_t, t, v_x, v_t = tiny_case(torch.float32)
    torch._dynamo.reset()
    compiled = SCDLoss(teacher.model, SCDConfig(attention="math", compile_jvp=True))._jvp(student, x_t, t, {}, v_x, v_t)
    eager = SCDLoss(teacher.model, SCDConfig(attention="math"))._jvp(student, x_t, t, {}, v_x, v_t)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4 * eager[1].abs().max().item())


def test_compile_jvp_refuses_the_finite_difference_tangent():
    with pytest.raises(ValueError, match="compile_jvp.*finite_difference"):
        resolve(cli={"teacher": "t", "output": "o", "objective": {"compile_jvp": True, "jvp": "finite_difference"}})
