"""The class-accuracy yardstick: the shipped classifier's stated test accuracy, chance level on shuffled labels,
and `scm-distill evaluate --class-accuracy` on a class-conditional export."""

from __future__ import annotations

import pytest
import torch

from scm_distill.data import load_images
from scm_distill.metrics.classifier import class_accuracy, predict, read_info, to_classifier_input


def fashion_test(**transform):
    try:
        return load_images("fashion-mnist", split="test", **transform)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist) and the Hub is offline")


def test_shipped_classifier_states_at_least_90_percent():
    assert read_info()["test_accuracy"]["padded-32"] >= 0.90


SUBSET = 2000  # evenly spaced test images: binomial std of a ~0.9 accuracy sqrt(0.9 * 0.1 / 2000) = 0.007


@pytest.fixture(scope="module")
def padded_test():
    test = fashion_test(pad_to=32, max_items=SUBSET)
    return test.uint8_images(), test.labels, predict(test.uint8_images())


@pytest.mark.parametrize("layout,transform", [("padded-32", {"pad_to": 32}), ("full-16", {"resize_to": 16})])
def test_classifier_reaches_its_stated_accuracy_on_the_real_test_images(layout, transform, padded_test):
    """The stated accuracy is on all 10,000 test images; an evenly spaced 2,000 (1,000 at 16x16) must agree within
    4 binomial standard deviations (0.03 and 0.05)."""
    if layout == "padded-32":
        _, labels, predicted = padded_test
        accuracy, tolerance = float((predicted == labels).double().mean()), 0.03
    else:
        test = fashion_test(**transform, max_items=SUBSET // 2)
        accuracy, tolerance = class_accuracy(test.uint8_images(), test.labels), 0.05
    assert accuracy == pytest.approx(read_info()["test_accuracy"][layout], abs=tolerance)


def test_rgb_copies_classify_like_the_grey_images(padded_test):
    grey, _, predicted = padded_test
    assert torch.equal(predict(grey[:500].expand(-1, 3, -1, -1).contiguous()), predicted[:500])


def test_accuracy_is_chance_on_class_shuffled_samples(padded_test):
    """Labels permuted across 1,000 real test images: the classifier still predicts each image's true class, so a hit
    needs the permuted label to equal it: P = sum_c p_c q_c ~ 1/10 for ~uniform classes (binomial std 0.0095 at
    n = 1,000, bound at 4 std). It fails if class_accuracy ignored or misaligned its labels."""
    images, labels, predicted = padded_test[0][::2], padded_test[1][::2], padded_test[2][::2]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert float((predicted == labels).double().mean()) > 0.85  # the same images with their own labels
    assert class_accuracy(images, shuffled) == pytest.approx(0.1, abs=0.04)


def test_classifier_input_rules_and_bad_inputs():
    x = to_classifier_input(torch.full((2, 3, 16, 16), 255, dtype=torch.uint8))
    assert x.shape == (2, 1, 32, 32) and torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="uint8 images"):
        class_accuracy(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), [0, 1])
    with pytest.raises(ValueError, match="one label per image"):
        class_accuracy(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0])
    with pytest.raises(ValueError, match="labels in 0..9"):
        class_accuracy(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, 10])


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    """(teacher, export, data) of a 2-step distillation of the tiny random DiT (1,000 classes, 32x32 RGB)."""
    from tiny_pipelines import save_class_images, save_tiny

    from scm_distill.config import resolve
    from scm_distill.trainer import distill

    root = tmp_path_factory.mktemp("dit")
    teacher, data = save_tiny("dit", root / "teacher"), save_class_images(root / "data")
    config = resolve(cli={"teacher": str(teacher), "output": str(root / "run"), "data": {"spec": str(data)},
                          "train": {"max_steps": 2, "convert_steps": 1, "batch_size": 4, "sample_every": 0,
                                    "checkpoint_every": 0}, "guidance": {"embedding_dim": 32}})  # fmt: skip
    return teacher, distill(config).export_dir, data


def test_evaluate_records_class_accuracy_of_every_sampler(dit_export, tmp_path):
    from scm_distill.evaluation.evaluate import EvalSettings, LabelledSampler, evaluate

    teacher, export, data = dit_export
    labelled = LabelledSampler(export, trust_remote_code=True)
    assert labelled.inputs(4, seed=0, start=8)["class_labels"] == [8, 9, 0, 1]  # classes in order
    settings = EvalSettings(steps=(2,), teacher_steps=(2,), num_samples=10, batch_size=10,
                            class_accuracy="fashion-mnist",
                            trust_remote_code=True)  # fmt: skip
    metrics = evaluate(export, str(data), tmp_path / "eval", str(teacher), settings)
    assert set(metrics["results"]) == {"student@2", "teacher@2"} and metrics["class_accuracy"] == "fashion-mnist"
    assert all(0 <= r["accuracy"] <= 1 for r in metrics["results"].values())
    assert "Class accuracy" in (tmp_path / "eval" / "report.md").read_text()


def test_class_accuracy_bad_inputs(tiny_run, tmp_path):
    from conftest import run_cli

    done = run_cli("evaluate", "--model", str(tiny_run.export_dir), "--reference", "digits", "--num-samples", "8",
                   "--class-accuracy", "fashion-mnist", "--output", str(tmp_path / "e1"))  # fmt: skip
    assert done.returncode == 1 and "is unconditional, so its samples have no class" in done.stderr
    done = run_cli("evaluate", "--model", str(tiny_run.export_dir), "--reference", "digits",
                   "--class-accuracy", "cifar", "--output", str(tmp_path / "e2"))  # fmt: skip
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_text_exports_need_the_ten_class_captions():
    from types import SimpleNamespace

    from scm_distill.evaluation.evaluate import EvalSettings, check_class_accuracy

    sampler = SimpleNamespace(conditioning="text", prompts=("a photo of a bag",) * 3, folder="export")
    with pytest.raises(ValueError, match="the 10 class captions in class order, one per line; got 3 prompts"):
        check_class_accuracy(EvalSettings(class_accuracy="fashion-mnist"), sampler)
    check_class_accuracy(EvalSettings(class_accuracy="fashion-mnist"), SimpleNamespace(
        conditioning="text", prompts=("p",) * 10, folder="export"))  # ten prompts: accepted
