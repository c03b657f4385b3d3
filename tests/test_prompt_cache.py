"""The prompt cache of the text-conditioned teachers: the network inputs it returns are the teacher's own encode()
of the same prompts, each distinct prompt is encoded once, a change of what else the inputs carry (SDXL's time ids
carry the resolution) encodes again, and the byte budget drops the least recently used prompt first."""

import pytest
import torch
from tiny_pipelines import tiny_sana_pipeline, tiny_sdxl_pipeline

from scm_distill.families.prompt_cache import PromptCache, condition_bytes
from scm_distill.families.sana import SanaTeacher
from scm_distill.families.sd import StableDiffusionXLTeacher

BATCHES = [["a cat", "two dots", "a cat", "a red square"], ["two dots", "a dog", "a cat", "a dog"]]
TEACHERS = {"sdxl": (tiny_sdxl_pipeline, StableDiffusionXLTeacher), "sana": (tiny_sana_pipeline, SanaTeacher)}


def assert_same(cached, direct):
    assert type(cached) is type(direct)
    if isinstance(direct, dict):
        assert cached.keys() == direct.keys()
        for key in direct:
            assert_same(cached[key], direct[key])
    elif isinstance(direct, torch.Tensor):
        assert cached.shape == direct.shape and cached.dtype == direct.dtype
        torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-6)
    else:
        assert cached == direct


def counting(teacher):
    """The teacher with its encode() counting the prompts it encodes."""
    encoded, encode = [], teacher.encode

    def wrapped(inputs):
        encoded.extend(inputs["prompt"])
        return encode(inputs)

    teacher.encode = wrapped
    return encoded


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_cached_inputs_are_the_teachers_own_and_each_prompt_is_encoded_once(family):
    build, teacher_class = TEACHERS[family]
    teacher = teacher_class(build(), "tiny", ".", 0.5)
    direct = [teacher.encode({"prompt": batch}) for batch in BATCHES]
    encoded = counting(teacher)
    for batch, reference in zip(BATCHES, direct, strict=True):
        assert_same(teacher.encoded({"prompt": batch}), reference)
    assert sorted(encoded) == sorted(set(BATCHES[0]) | set(BATCHES[1]))  # a cat, two dots, a red square, a dog


def test_sdxl_time_ids_follow_the_resolution_through_the_cache():
    teacher = StableDiffusionXLTeacher(tiny_sdxl_pipeline(), "tiny", ".", 0.5)
    encoded = counting(teacher)
    first = teacher.encoded({"prompt": ["a cat"]})
    teacher.resolution = (2 * teacher.resolution[0], 2 * teacher.resolution[1])
    second = teacher.encoded({"prompt": ["a cat"]})
    assert encoded == ["a cat", "a cat"]
    assert second["time_ids"][0, 0] == 2 * first["time_ids"][0, 0]
    assert_same(second, teacher.encode({"prompt": ["a cat"]}))


def test_the_budget_drops_the_least_recently_used_prompt_first():
    calls = []

    def encode(prompts):
        calls.extend(prompts)
        return {"states": torch.stack([torch.full((4,), float(len(p))) for p in prompts]), "note": "same"}

    row_bytes = condition_bytes({"states": torch.zeros(1, 4)})  # one prompt's row: 4 float32 = 16 bytes
    cache = PromptCache(encode, max_bytes=2 * row_bytes)  # room for two prompts
    cache(["a", "bb"])
    cache(["a"])  # "a" is now the most recent, "bb" the least
    out = cache(["ccc", "a"])  # "ccc" in, over budget: "bb" out
    assert calls == ["a", "bb", "ccc"]
    assert out["states"][:, 0].tolist() == [3.0, 1.0] and out["note"] == "same"
    assert cache.bytes == 2 * row_bytes
    cache(["bb"])
    assert calls[-1] == "bb"  # encoded again: it had been dropped


def test_a_batch_keeps_its_own_cached_prompts_while_it_adds_new_ones():
    """The new prompt of a full cache drops the least recent one not in the batch, even when the batch's cached
    prompt was the least recent before the call."""
    cache = PromptCache(lambda prompts: {"states": torch.stack([torch.full((4,), float(len(p))) for p in prompts])},
                        max_bytes=2 * condition_bytes({"states": torch.zeros(1, 4)}))  # fmt: skip
    cache(["a", "bb"])  # "a" is the least recent
    out = cache(["ccc", "a"])
    assert out["states"][:, 0].tolist() == [3.0, 1.0]
    assert [prompt for prompt, _ in cache.rows] == ["a", "ccc"]  # "bb" dropped, "a" kept
