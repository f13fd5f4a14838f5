"""The engine's inversions kept in memory (``runners.editor.RecentLatents``): an image inverted once
is served again without a network call, to any editor of the same model, only for the same batch
regime, and the store keeps at most its capacity."""
from __future__ import annotations

from pathlib import Path

import torch

from models import latent_shapes
from models.loading import LoadedModel
from runners.editor import Editor, RecentLatents
from tests.helpers import tiny_config, tiny_net
from utils.config import parse_config
from utils.core.diffusion import make_alphas_cumprod


def test_recent_latents_serve_an_image_once_inverted_without_a_network_call():
    config = parse_config(tiny_config("ddpm", name="tiny_mem"))
    model = LoadedModel(config=config, checkpoint=Path("random.pt"), checkpoint_sha256="0" * 64, net=tiny_net("ddpm"),
                        alphas_cumprod=make_alphas_cumprod(0.0001, 0.02, 1000), shapes=latent_shapes(config))
    recent = RecentLatents(capacity=2)
    calls = []
    first, second = (Editor(model, t_0=300, n_inv_step=4, show_progress=False, recent=recent) for _ in range(2))
    for editor in (first, second):
        editor.net.on_call = lambda done, total: calls.append(done)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents, hits = first.invert(images[:2], batch_size=2)
    assert hits == 0 and len(calls) == 3  # one batch of two, 3 steps up to t_0
    calls.clear()
    again, hits = second.invert(images[:2], batch_size=2)  # another editor of the same model shares them
    assert hits == 2 and calls == [] and torch.equal(again.z, latents.z) and torch.equal(again.h, latents.h)
    _, hits = second.invert(images[:1], batch_size=1)  # a batch of one rounds otherwise: not the same entry
    assert hits == 0 and len(calls) == 3
    assert len(recent) == 2  # the capacity holds: the least recently used entry went
