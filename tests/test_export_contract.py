"""One export contract for every family: `DiffusionPipeline.from_pretrained(path)` (trust_remote_code only where the
folder ships code) and `pipe(<inputs>, num_inference_steps=n)`, in a process that cannot import scm_distill, gives
exactly the toolkit's samples with exactly n network evaluations; it survives `save_pretrained` and reload; its
outputs, generator lists and description behave as a diffusers user expects; its card shows that call."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from export_forms import FORMS

from scm_distill.export.contract import read_description
from scm_distill.run_outputs import sampler_info

# Runs where scm_distill cannot be imported: samples, network-call counts, re-save round trip, output forms.
LOAD_WITHOUT_SCM_DISTILL = """
import json, sys, tempfile
sys.modules["scm_distill"] = None
import numpy as np
import torch
from diffusers import DiffusionPipeline
folder, inputs, trust, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust)
pipe.set_progress_bar_config(disable=True)
denoiser = getattr(pipe, "unet", None) or pipe.transformer
calls = []
denoiser.register_forward_hook(lambda *args: calls.append(1))
def run(steps, seed=7, **kwargs):
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(**{**inputs, **kwargs}, num_inference_steps=steps, generator=generator, output_type="np").images
out = {"class": type(pipe).__name__}
for steps in (1, 2):
    calls.clear()
    out[steps] = run(steps)
    out[f"calls-{steps}"] = len(calls)
out["four"] = run(4).shape
tuple_out = pipe(**inputs, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np",
                 return_dict=False)
out["tuple"] = np.array_equal(tuple_out[0], out[2])
pt = pipe(**inputs, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
out["pt"] = bool(np.allclose(pt.permute(0, 2, 3, 1).numpy(), out[2], atol=1e-6))
out["pil"] = type(pipe(**inputs, num_inference_steps=2, output_type="pil").images[0]).__name__
single = {k: v[:1] if isinstance(v, list) else 1 if k == "batch_size" else v for k, v in inputs.items()}
generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
batch = run(2, generator=generators)
alone = pipe(**single, num_inference_steps=2, generator=torch.Generator().manual_seed(11), output_type="np").images
out["generator-list"] = bool(np.allclose(batch[:1], alone, atol=1e-5))
with tempfile.TemporaryDirectory() as tmp:
    pipe.save_pretrained(tmp)
    again = DiffusionPipeline.from_pretrained(tmp, trust_remote_code=trust)
    again.set_progress_bar_config(disable=True)
    out["resaved"] = again(**inputs, num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                           output_type="np").images
    composed = type(pipe)(**pipe.components)
    composed.set_progress_bar_config(disable=True)
    out["composed"] = composed(**inputs, num_inference_steps=2, generator=torch.Generator().manual_seed(7),
                               output_type="np").images
torch.save(out, out_file)
"""


@pytest.fixture(scope="module")
def loaded(export, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{export.form}-load")
    script, out_file = root / "load.py", root / "out.pt"
    script.write_text(LOAD_WITHOUT_SCM_DISTILL)
    trust = "1" if read_description(export.folder).trust_remote_code else "0"
    done = subprocess.run([sys.executable, str(script), str(export.folder), json.dumps(export.inputs), trust,
                           str(out_file)], cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_file, weights_only=False)


def toolkit_images(export, steps: int) -> torch.Tensor:
    """The toolkit's samples [B, H, W, C] in [0, 1] of the EMA student for the same call and seed (one thread, as in
    the export's process)."""
    info = sampler_info(export.config, export.result.ema)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export.teacher.student_float_images(export.network(), info, export.inputs, steps,
                                                   torch.Generator().manual_seed(7))  # fmt: skip
    finally:
        torch.set_num_threads(threads)


SAME_SAMPLES = 1e-5  # [0, 1] images: float rounding between two processes (measured up to 1.7e-6 on the tiny FLUX
# export, diffusers 0.42.1) - far below one uint8 level (3.9e-3), which such a difference can still flip at a rounding
# edge, so the images are compared before quantisation


def test_the_call_is_the_toolkit_sampler_with_n_network_evaluations(export, loaded):
    for steps in (1, 2):
        torch.testing.assert_close(torch.as_tensor(loaded[steps]), toolkit_images(export, steps), rtol=0,
                                   atol=SAME_SAMPLES, msg=f"{steps}-step samples differ")
        assert loaded[f"calls-{steps}"] == steps
    assert loaded["four"][0] == len(export.inputs.get("prompt", export.inputs.get("class_labels", [0, 0])))


def test_the_export_behaves_like_a_diffusers_pipeline(loaded):
    assert loaded["tuple"] and loaded["pt"] and loaded["pil"] == "Image"
    assert loaded["generator-list"], "a list of generators does not reproduce each sample"
    assert (loaded["resaved"] == loaded[2]).all(), "save_pretrained + from_pretrained changes the samples"
    assert (loaded["composed"] == loaded[2]).all(), "Pipe(**pipe.components) changes the samples"


def test_description_and_card_show_the_one_call(export):
    description = read_description(export.folder)
    card = (export.folder / "README.md").read_text()
    assert "num_inference_steps=2" in card and "scm_call" not in card and "json.load" not in card
    assert ("trust_remote_code=True" in card) == description.trust_remote_code
    assert str(export.teacher_dir) not in card and "/tmp" not in card
    for path in export.folder.rglob("*.json"):
        assert str(export.teacher_dir) not in path.read_text() and "_name_or_path" not in path.read_text(), path
    tag = {"dit": None}.get(export.form, "unconditional-image-generation" if export.form == "unet2d" else
                            "text-to-image")  # fmt: skip
    assert description.pipeline_tag == tag and (f"pipeline_tag: {tag}" in card) == (tag is not None)
    assert description.base_model is None and "base_model:" not in card  # a local teacher has no Hub id
    lora = FORMS[export.form][1] > 0
    assert (description.lora == "lora") == lora and (export.folder / "lora").is_dir() == lora
    assert not (export.folder / "pytorch_lora_weights.safetensors").exists()  # load_lora_weights(export) finds none
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in export.folder.rglob("*"))
    stock = export.form in ("unet2d", "sd", "sd-lora", "sdxl")
    assert description.trust_remote_code != stock
