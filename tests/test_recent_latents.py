"""The engine's inversions kept in memory (``runners.engine.editor.RecentLatents``): an image inverted once
is served again without a network call, to any editor of the same model, only for the same batch
regime, and the store keeps at most its capacity."""
from __future__ import annotations

import dataclasses

import torch

from runners.engine.editor import Editor, RecentLatents
from tests.helpers import loaded_tiny_model


def test_recent_latents_serve_an_image_once_inverted_without_a_network_call():
    model = loaded_tiny_model("ddpm", name="tiny_mem")
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


def test_recent_latents_never_serve_another_models_latents():
    """Editors of another checkpoint or precision sharing one store invert again (before, the store
    keyed only on t_0, steps, regime and pixels, and served the first model's latents)."""
    model = loaded_tiny_model("ddpm", name="tiny_mem")
    other_weights = loaded_tiny_model("ddpm", name="tiny_mem", seed=1, sha256="1" * 64)
    other_precision = dataclasses.replace(model, identity=dataclasses.replace(model.identity, precision="bf16"))
    recent = RecentLatents(capacity=8)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, _ = Editor(model, 300, 4, show_progress=False, recent=recent).invert(images, 2)
    for other in (other_weights, other_precision):
        latents, hits = Editor(other, 300, 4, show_progress=False, recent=recent).invert(images, 2)
        assert hits == 0
    assert not torch.equal(Editor(other_weights, 300, 4, show_progress=False, recent=recent).invert(images, 2)[0].z,
                           first.z)


def test_one_owner_cannot_evict_another_owners_latents():
    """With a per-owner share, the uploads of one session never push out another session's images."""
    model = loaded_tiny_model("ddpm", name="tiny_mem")
    recent = RecentLatents(capacity=6, per_owner=3)
    editor = Editor(model, 300, 2, show_progress=False, recent=recent)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    editor.invert(images[:1], 1, owner="a")
    for i in range(1, 8):  # session b uploads seven images
        editor.invert(images[i:i + 1], 1, owner="b")
    assert editor.invert(images[:1], 1, owner="a")[1] == 1  # a's image is still held
    assert len(recent) <= 4  # a's one and b's latest three
