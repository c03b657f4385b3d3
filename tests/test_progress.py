"""Progress on the long phases (issue 16 item 2): the sample grid, evaluation sampling, features, latents."""

import torch
from test_trainer import tiny_config

from scm_distill.evaluation.evaluate import EvalSettings, student_images
from scm_distill.progress import Ticking, bar, tracked
from scm_distill.trainer import distill


def test_the_sample_grid_shows_its_progress(tiny_teacher, tmp_path, capfd):
    distill(tiny_config(tiny_teacher, tmp_path / "run", max_steps=1, convert_steps=0, sample_every=1))
    err = capfd.readouterr().err
    assert "sampling grid" in err and "NFE" in err


def test_evaluation_sampling_shows_its_progress(capfd):
    def sampler(n, steps, seed, start=0):
        return torch.zeros(n, 1, 2, 2, dtype=torch.uint8)

    images = student_images(sampler, 2, EvalSettings(num_samples=10, batch_size=4))
    assert images.shape[0] == 10
    err = capfd.readouterr().err
    assert "sampling student@2" in err and "10/10" in err


def test_tracked_and_ticking(capfd):
    assert list(tracked(range(3), "three things")) == [0, 1, 2]

    class Model:
        sigma_d = 0.5

        def F(self, x):
            return x + 1

    with bar(2, "ticks") as shown:
        ticking = Ticking(Model(), shown)
        assert ticking.F(1) == 2 and ticking.F(2) == 3 and ticking.sigma_d == 0.5
        assert shown.n == 2
    assert "three things" in capfd.readouterr().err
