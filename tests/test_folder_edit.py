"""Folder editing: --img_path takes a file, a folder or a glob; the B x K edits of all images are
denoised in mixed batches, and each image's results equal those of a single-image run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main as cli
from tests.helpers import make_edit_setup, moves_along, tiny_net
from utils.core.diffusion import invert, make_alphas_cumprod, timestep_grid
from utils.core.editing import edit_sequence, iter_edits
from utils.core.seeds import item_seed
from utils.errors import UserError
from utils.io.images import expand_image_paths, quantize
from runners.engine.outputs import THUMBNAIL, folder_names, thumbnail


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_edit_setup(tmp_path_factory.mktemp("folder"), attributes=("bright",))


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_folder_run_equals_single_image_runs(setup, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(setup["images"].iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    # 3 readable images x 3 distances = 9 edits in batches of 4: batches mix images and distances.
    code = cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(folder), "--exp", str(tmp_path / "f"),
                     "--bs_train", "2", "--edit_batch_size", "4", "--save_tensors"])
    err = capsys.readouterr().err
    assert code == 1, "a failed image makes the run exit 1"
    assert "broken.png" in err.strip().splitlines()[-1]
    run_dir = tmp_path / "f" / "edit"
    top = json.loads((run_dir / "summary.json").read_text())
    assert list(top["failed"]) == [str(folder / "broken.png")]
    assert [i["folder"] for i in top["images"]] == [f"img{i}" for i in range(3)]  # relative to the run folder
    assert (run_dir / "contact_sheet.png").is_file()
    for i in range(3):
        single = tmp_path / f"s{i}"
        assert cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(folder / f"img{i}.png"),
                         "--exp", str(single), "--edit_batch_size", "2", "--save_tensors"]) == 0
        mine, alone = run_dir / f"img{i}", single / "edit"
        assert _files(mine) == _files(alone)
        a = torch.load(mine / "tensors.pt", weights_only=True)
        b = torch.load(alone / "tensors.pt", weights_only=True)
        assert set(a) == set(b)
        for key in a:
            assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5, rtol=0), \
                f"img{i} {key}: {(a[key].double() - b[key].double()).abs().max()}"
        assert json.loads((mine / "summary.json").read_text())["seeds"] == \
            json.loads((alone / "summary.json").read_text())["seeds"]


def test_glob_selects_images(setup, tmp_path, capsys):
    pattern = str(setup["images"] / "img[01].png")
    assert cli.main([*setup["common"], "--edit_image_boundary", "--img_path", pattern, "--exp", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "edit").iterdir() if p.is_dir()) == ["img0", "img1"]


def test_expand_image_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert expand_image_paths(tmp_path / "a.png") == ([tmp_path / "a.png"], False)
    assert expand_image_paths(tmp_path) == ([tmp_path / "a.png", tmp_path / "b.jpg"], True)
    assert expand_image_paths(str(tmp_path / "*.jpg")) == ([tmp_path / "b.jpg"], True)
    with pytest.raises(UserError, match="no images"):
        expand_image_paths(str(tmp_path / "*.gif"))
    with pytest.raises(UserError, match="does not exist"):
        expand_image_paths(tmp_path / "missing.png")


HOSTILE_NAMES = ["..png", "...png", "summary.json.png", "contact_sheet.png.png", "a\nb.png", "x.png", "x.jpg",
                 "X.png", ".hidden.png", "tab\tname.png"]


def test_folder_names_are_the_tools_own():
    names = folder_names([Path("in") / n for n in HOSTILE_NAMES])
    assert names == ["image", "image-2", "summary.json-2", "contact_sheet.png-2", "a_b", "x", "x-2", "X-3",
                     "hidden", "tab_name"]
    assert len({n.lower() for n in names} | {"summary.json", "contact_sheet.png"}) == len(names) + 2
    assert all(n and not n.startswith(".") and "/" not in n and n.isprintable() for n in names)


def test_hostile_file_names_write_inside_their_own_folders(setup, tmp_path, capsys):
    """Dots, output names, control characters and clashes: every image edited into a folder of its
    own inside the run folder, the summary naming each folder's original file, nothing beside."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in HOSTILE_NAMES:
        (folder / name).write_bytes((setup["images"] / "img0.png").read_bytes())
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "summary.json").write_text("the user's own")
    code = cli.main([*setup["common"], "--edit_image_boundary", "--img_path", str(folder), "--exp", str(exp)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in exp.iterdir()) == ["edit", "summary.json"]
    assert (exp / "summary.json").read_text() == "the user's own"
    run_dir = exp / "edit"
    top = json.loads((run_dir / "summary.json").read_text())
    assert {i["folder"]: Path(i["image"]).name for i in top["images"]} == \
        dict(zip(folder_names([folder / n for n in sorted(HOSTILE_NAMES)]), sorted(HOSTILE_NAMES)))
    for entry in top["images"]:
        assert (run_dir / entry["folder"] / "grid.png").is_file()
        assert json.loads((run_dir / entry["folder"] / "summary.json").read_text())["image"] == entry["image"]
    assert (run_dir / "contact_sheet.png").is_file()


def test_contact_sheet_rows_are_thumbnails():
    row = quantize(torch.rand(3, 3, 256, 256) * 2 - 1)
    small = thumbnail(row)
    assert small.shape == (3, 3, THUMBNAIL, THUMBNAIL) and small.dtype == torch.uint8
    assert thumbnail(row[..., :64, :64]) is not None and torch.equal(thumbnail(row[..., :64, :64]), row[..., :64, :64])
    # area averaging: a tile's mean brightness is kept to within rounding
    assert (small.float().mean((2, 3)) - row.float().mean((2, 3))).abs().max() < 1.0


def test_b_by_k_edits_equal_each_image_alone():
    eta = 1.0
    net, ac, grid = tiny_net("ddpm", seed=4), make_alphas_cumprod(0.0001, 0.02, 1000), timestep_grid(300, 4)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    inv = invert(net, x0, ac, grid)
    gen = torch.Generator().manual_seed(9)
    n_z, n_h = torch.randn(3 * 16 * 16, generator=gen), torch.randn(32 * 8 * 8, generator=gen)
    n_z, n_h = n_z / n_z.norm(), n_h / n_h.norm()
    distances = torch.linspace(-10, 10, 3, dtype=torch.float64)
    seeds = [[item_seed(7, b, k) for k in range(3)] for b in range(2)]
    together = edit_sequence(net, inv, ac, grid, *moves_along(distances, n_z, n_h), seeds, eta=eta, batch_size=4)
    assert together.shape == (2, 3, 3, 16, 16)
    for b in range(2):
        one = type(inv)(inv.z[b:b + 1], inv.h[b:b + 1])
        alone = edit_sequence(net, one, ac, grid, *moves_along(distances, n_z, n_h), seeds[b], eta=eta, batch_size=2)
        assert torch.allclose(together[b], alone, atol=1e-5, rtol=0), (together[b] - alone).abs().max()
    # Batches come out image-major, each with its edited latents (z moved to the distances).
    batches = list(iter_edits(net, inv, ac, grid, *moves_along(distances, n_z), seeds, eta=eta, batch_size=4))
    assert [b.items for b in batches] == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2)]]
    assert all(b.h is None for b in batches)
    z = torch.cat([b.z for b in batches]).reshape(6, -1).double()
    assert torch.allclose(z @ n_z.double(), distances.repeat(2), atol=1e-4)
    torch.testing.assert_close(torch.cat([b.images for b in batches]).reshape(2, 3, 3, 16, 16),
                               edit_sequence(net, inv, ac, grid, *moves_along(distances, n_z), seeds, eta=eta, batch_size=4),
                               rtol=0, atol=0)  # the same batches and inputs: the same kernels
    with pytest.raises(ValueError, match="seeds"):
        list(iter_edits(net, inv, ac, grid, *moves_along(distances, n_z, n_h), seeds[:1], eta=eta))


def test_edited_latents_are_made_per_batch_not_for_all_distances_at_once(monkeypatch):
    """Memory does not grow with K: each batch moves only its own latents (not those of all K
    distances before the first denoising call, which for 100,000 edits would not fit)."""
    import utils.core.editing as editing

    calls = []
    real = editing.joint_move

    def recording(v, normals, targets, held=None):
        calls.append(len(targets))
        return real(v, normals, targets, held)

    monkeypatch.setattr(editing, "joint_move", recording)
    net = tiny_net("ddpm", seed=4)
    ac = make_alphas_cumprod(1e-4, 2e-2, 1000)
    grid = timestep_grid(40, 3)
    inv = invert(net, torch.zeros(1, 3, 16, 16), ac, grid)
    normal = torch.ones(3 * 16 * 16) / (3 * 16 * 16) ** 0.5
    distances = torch.linspace(-1, 1, 10, dtype=torch.float64)
    batches = list(iter_edits(net, inv, ac, grid, *moves_along(distances, normal), [list(range(10))], eta=0.0, batch_size=3))
    assert [len(b.items) for b in batches] == [3, 3, 3, 1]
    assert max(calls) <= 3, calls


def test_a_folder_goes_through_in_groups_with_the_results_of_one_group(setup, tmp_path, monkeypatch, capsys):
    """Memory: a folder's images are inverted, reconstructed and edited a group at a time; a group
    is a multiple of both batch sizes, so every batch is the one a single group forms: same bits."""
    import runners.engine.editor as engine

    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(setup["images"].iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    argv = [*setup["common"], "--edit_image_boundary", "--img_path", str(folder), "--bs_train", "2",
            "--edit_batch_size", "2", "--save_tensors", "--no_cache"]
    assert cli.main([*argv, "--exp", str(tmp_path / "one_group")]) == 0, capsys.readouterr().err
    monkeypatch.setattr(engine, "GROUP_IMAGES", 2)  # groups of 2 + 1
    assert cli.main([*argv, "--exp", str(tmp_path / "groups")]) == 0, capsys.readouterr().err
    for name in (p.stem for p in sorted(folder.iterdir())):
        a = torch.load(tmp_path / "one_group" / "edit" / name / "tensors.pt", weights_only=True)
        b = torch.load(tmp_path / "groups" / "edit" / name / "tensors.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

