"""Checks the engine makes once, wherever a request comes from: a request refused in one line before
any file is read, a LOCO region refused before any inversion where its exact Jacobian is too large,
latents read back from where they are, and the t_0 rule never ranking an unmeasured linearity."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from runners.engine import UserError
from runners.engine.editor import Editor, RecentLatents
from runners.engine.regions import check_loco
from runners.engine.requests import Denoising, EditRequest, Move, Region, check_request
from runners.engine.t0_report import recommend_t0
from tests.helpers import loaded_tiny_model
from utils.io.latent_cache import entry_rows


def _request(**fields) -> EditRequest:
    return EditRequest((Move("a", -1.0, 1.0),), Denoising(4), **fields)


def test_moving_h_alone_with_h_left_as_it_is_is_refused_with_the_request():
    """Before: refused only while describing the edit, after the model and the boundary folder loaded."""
    with pytest.raises(UserError, match="--region_h none leaves h as it is"):
        check_request(_request(space="h", region=Region("0,0,1,0.5", h="none")))
    check_request(_request(space="z", region=Region("0,0,1,0.5", h="none")))


def test_held_names_given_as_one_string_are_refused_as_such_whatever_their_length():
    """Before: a string of over 31 characters was counted character by character ("at most 32 attributes")."""
    for held in ("Smiling", "Smiling,Eyeglasses,Young,Pale_Skin,Mustache"):
        with pytest.raises(UserError, match="held attributes are a list of names"):
            check_request(_request(held=held))


def test_loco_is_refused_beyond_the_latents_its_exact_jacobian_affords():
    """Before: a 256-px model ran its inversion and unedited runs, then failed with an internal error."""
    loco = Region("0,0,1,0.5", h="none", method="loco")
    check_loco(loco, (3, 32, 32))  # 3,072 values: the largest it affords
    with pytest.raises(UserError, match=r"this model's have 12288 \(3 x 64 x 64\): use --region_method blend"):
        check_loco(loco, (3, 64, 64))
    check_loco(Region("0,0,1,0.5"), (3, 256, 256))  # blending has no such bound


def test_latents_served_from_memory_are_read_from_memory_when_the_disk_has_none(tmp_path):
    """Before: latent_entries named a disk entry for every image whenever the cache was writable, so
    latents found in memory whose file was gone failed the search with 'rerun the same command'."""
    model = loaded_tiny_model()
    editor = Editor(model, 300, 4, tmp_path / "cache", show_progress=False, recent=RecentLatents(8))
    images = torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, _ = editor.invert(images, 2)
    shutil.rmtree(tmp_path / "cache")  # e.g. the cache cleared while the process ran
    entries, cached = editor.latent_entries(images, 2)
    assert cached == 3 and all(isinstance(e, dict) for e in entries)
    read = entry_rows(editor.cache, entries, "z", model.shapes["z"])
    np.testing.assert_array_equal(read(0, 3), first.z.flatten(1).numpy())
    fresh = Editor(model, 300, 4, tmp_path / "cache", show_progress=False)  # no memory: on disk again
    entries, _ = fresh.latent_entries(images, 2)
    assert all(isinstance(e, str) for e in entries)


def test_an_unmeasured_linearity_never_wins_the_t_0_rule():
    """Before: a NaN linearity (a zero step) listed first beat every other, as max never passes over NaN."""
    rows = [{"t": t, "linearity": lin, "test_acc": {"z": 0.9, "h": 0.9}} for t, lin in ((100, math.nan), (200, 0.85),
                                                                                         (300, 0.6))]
    assert recommend_t0(rows, n_test=200)["t_0"] == 200
    unlabelled = [{"t": t, "linearity": lin} for t, lin in ((100, math.nan), (200, 0.5))]
    assert recommend_t0(unlabelled)["t_0"] == 200
