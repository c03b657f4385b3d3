"""The student's time-embedding low-pass: what it removes, that it stays removed in training, and that the plain
diffusers model (no hook) computes the same function after save/load."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding

from scm_distill.student import low_pass_time_embedding, timestep_frequencies

MAX_FREQUENCY = 0.02  # rad per timestep


def test_frequencies_are_the_embeddings_own():
    # d/dtau of channel i is +-f_i times the other channel of its pair, so the embedding's JVP at tau along 1 gives f_i
    # up to sign on one of the pair: |jvp_i|^2 + |jvp_{i+half}|^2 = f_i^2 exactly.
    time_proj = tiny_unet().time_proj
    tau = torch.tensor([137.25])
    _, d = torch.func.jvp(time_proj, (tau,), (torch.ones(1),))
    half = time_proj.num_channels // 2
    f = timestep_frequencies(time_proj)
    torch.testing.assert_close(d[0, :half] ** 2 + d[0, half:] ** 2, f[:half] ** 2)


def test_low_pass_removes_exactly_the_fast_channels():
    unet = tiny_unet()
    reference = tiny_unet()  # same seed: same weights
    removed = low_pass_time_embedding(unet, MAX_FREQUENCY)
    keep = timestep_frequencies(unet.time_proj) <= MAX_FREQUENCY
    assert removed == int((~keep).sum()) and 0 < removed < len(keep)
    # reference: the untouched network fed a time embedding whose fast channels are zeroed by hand
    x, tau = torch.randn(2, 1, 8, 8), torch.tensor([10.5, 700.0])
    emb = get_timestep_embedding(tau, unet.time_proj.num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
    with torch.no_grad():
        hand = reference.time_embedding(emb * keep)
        reference.time_embedding = _Fixed(hand)
        torch.testing.assert_close(unet(x, tau).sample, reference(x, tau).sample)
    # and no channel of what remains turns faster than the cutoff
    _, d = torch.func.jvp(unet.time_proj, (tau,), (torch.ones(2),))
    assert d.abs().max() <= MAX_FREQUENCY


class _Fixed(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


def test_removed_columns_get_no_gradient_and_the_export_needs_no_hook(tmp_path):
    unet = tiny_unet()
    low_pass_time_embedding(unet, MAX_FREQUENCY)
    keep = timestep_frequencies(unet.time_proj) <= MAX_FREQUENCY
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    x, tau = torch.randn(2, 1, 8, 8), torch.tensor([3.7, 512.0])
    for _ in range(2):
        optimizer.zero_grad()
        unet(x, tau).sample.square().mean().backward()
        assert torch.count_nonzero(unet.time_embedding.linear_1.weight.grad[:, ~keep]) == 0
        optimizer.step()
    assert torch.count_nonzero(unet.time_embedding.linear_1.weight[:, ~keep]) == 0
    unet.save_pretrained(tmp_path)
    plain = UNet2DModel.from_pretrained(tmp_path)  # no hook: the zero columns alone remove the channels
    with torch.no_grad():
        torch.testing.assert_close(plain(x, tau).sample, unet(x, tau).sample)


def test_networks_without_a_sinusoidal_time_embedding_are_refused():
    with pytest.raises(ValueError, match="time_embedding_max_frequency needs"):
        low_pass_time_embedding(torch.nn.Linear(2, 2), MAX_FREQUENCY)
