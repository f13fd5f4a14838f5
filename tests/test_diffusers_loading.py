"""diffusers UNet2DModel folders load as our DDPM and compute what diffusers computes.

A diffusers UNet2DModel of the google/ddpm-ema-*-256 architecture (docs/diffusers.md) at a quarter
of the width and 64 px, with random weights, is saved with ``save_pretrained`` (safetensors and
.bin, at top level and under unet/) and loaded through ``--model_path``; our noise prediction, our
bottleneck h and a CLI DDIM inversion are compared with diffusers' own forward pass. diffusers is
imported by these tests only, never by the product. No network.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DModel
from PIL import Image

import main as cli
from models.diffusers_map import diffusers_to_ddpm
from models.loading import load_model
from tests.helpers import REPO, assert_one_error_line, write_labelled_set
from utils.io.boundary_files import BoundaryRecord, save_boundary
from utils.config import latent_shapes, parse_config
from utils.core.diffusion import invert, make_alphas_cumprod, timestep_grid
from utils.errors import UserError
from utils.io.images import load_image

SIZE = 64
# google/ddpm-ema-*-256: block_out_channels [128, 128, 256, 256, 512, 512], 32 groups; here a quarter of that.
SMALL_DIFFUSERS = dict(
    sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64, 128, 128),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8,
    downsample_padding=0, act_fn="silu", attention_head_dim=None)
SMALL_CONFIG = {
    "name": "small_ddpm",
    "data": {"dataset": "synthetic", "image_size": SIZE, "channels": 3},
    "model": {"type": "ddpm", "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2, 4, 4],
              "num_res_blocks": 2, "attn_resolutions": [4], "dropout": 0.0, "resamp_with_conv": True, "num_groups": 8},
    "diffusion": {"beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
}
FORMS = ("safetensors", "bin", "unet_subfolder")


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over the whole tensor."""
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


class DiffusersNet:
    """diffusers' forward with our network call: ``out, h = net(x, t)``, h the mid-block output."""

    def __init__(self, unet: UNet2DModel):
        self.unet, self.captured = unet, {}
        unet.mid_block.register_forward_hook(lambda module, inputs, output: self.captured.__setitem__("h", output))

    def __call__(self, x, t, h_override=None):
        assert h_override is None, "only plain forward passes are compared"
        with torch.no_grad():
            t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
            out = self.unet(x, t).sample
        return out, self.captured["h"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The diffusers model and its folders: {form: path} for every FORMS entry."""
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    unet = UNet2DModel(**SMALL_DIFFUSERS).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every weight off its initialisation (zero biases, unit norms)
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    unet.save_pretrained(root / "safetensors", safe_serialization=True)
    unet.save_pretrained(root / "bin", safe_serialization=False)
    unet.save_pretrained(root / "unet_subfolder" / "unet", safe_serialization=True)
    assert (root / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert not (root / "bin" / "diffusion_pytorch_model.safetensors").exists()
    return unet, {form: root / form for form in FORMS}


@pytest.fixture(scope="module")
def reference(saved):
    """Inputs and diffusers' outputs: (x, t, eps, h)."""
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 500, 999])
    return (x, t, *DiffusersNet(saved[0])(x, t))


@pytest.mark.parametrize("form", FORMS)
def test_forward_matches_diffusers(saved, reference, form):
    x, t, ref_eps, ref_h = reference
    loaded = load_model(SMALL_CONFIG, saved[1][form])
    assert loaded.checkpoint.name.endswith(".bin" if form == "bin" else ".safetensors")
    eps, h = loaded.net(x, t)
    assert h.shape == ref_h.shape == (3, *latent_shapes(SMALL_CONFIG)["h"])
    assert rel_error(eps, ref_eps) < 1e-5, rel_error(eps, ref_eps)
    assert rel_error(h, ref_h) < 1e-5, rel_error(h, ref_h)
    if form == "safetensors":  # the comparison can fail: a timestep off by one is seen
        assert rel_error(loaded.net(x, t + 1)[0], ref_eps) > 1e-4


def test_deprecated_attention_names_map_like_current_ones(saved):
    """Older diffusers files (as uploaded for google/ddpm-*) name the projections query/key/value/proj_attn."""
    unet, _ = saved
    state = unet.state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in old_names.items():
            if f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    current, renamed = diffusers_to_ddpm(state, 6), diffusers_to_ddpm(legacy, 6)
    assert current.keys() == renamed.keys()
    assert all(torch.equal(current[k], renamed[k]) for k in current)
    assert current["mid.attn_1.q.weight"].shape == (128, 128, 1, 1)
    assert torch.equal(current["up.4.attn.0.proj_out.weight"][:, :, 0, 0], state["up_blocks.1.attentions.0.to_out.0.weight"])


def _write_small_config(tmp_path) -> str:
    path = tmp_path / "small_ddpm.yml"
    path.write_text(yaml.safe_dump(SMALL_CONFIG))
    return str(path)


def test_cli_inversion_matches_diffusers(saved, tmp_path):
    """main.py --edit_image_boundary --save_tensors on the folder: z and h of the DDIM inversion
    equal those computed with diffusers' forward and our DDIM functions."""
    unet, folders = saved
    rng = np.random.default_rng(3)
    img = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(img)
    shapes, t_0, n_inv = latent_shapes(SMALL_CONFIG), 200, 5
    boundaries = {}
    for space in ("z", "h"):
        normal = rng.standard_normal(int(np.prod(shapes[space]))).astype(np.float32)
        normal /= np.linalg.norm(normal)
        boundaries[space] = save_boundary(tmp_path / f"b_{space}.npz", BoundaryRecord(
            normal=normal, coef=normal, intercept=0.0, shape=shapes[space], space=space, t_0=t_0,
            n_inv_step=n_inv, config_name="small_ddpm"))
    code = cli.main(["--edit_image_boundary", "--config", _write_small_config(tmp_path), "--model_path",
                     str(folders["safetensors"]), "--img_path", str(img), "--boundary_z", str(boundaries["z"]),
                     "--boundary_h", str(boundaries["h"]), "--t_0", str(t_0), "--n_inv_step", str(n_inv),
                     "--n_test_step", "2", "--edit_img_number", "1", "--exp", str(tmp_path / "run"),
                     "--no_cache", "--device", "cpu", "--save_tensors"])
    assert code == 0
    tensors = torch.load(tmp_path / "run" / "edit" / "tensors.pt", weights_only=True)
    x0 = load_image(img, SIZE, 3)
    ac = make_alphas_cumprod(0.0001, 0.02, 1000)
    ref = invert(DiffusersNet(unet), x0, ac, timestep_grid(t_0, n_inv))
    assert tensors["z"].shape == ref.z.shape and tensors["h"].shape == ref.h.shape
    assert rel_error(tensors["z"], ref.z) < 1e-4, rel_error(tensors["z"], ref.z)
    assert rel_error(tensors["h"], ref.h) < 1e-4, rel_error(tensors["h"], ref.h)
    assert rel_error(tensors["z"], x0) > 0.1  # it did move away from the image


def _folder_with_config(saved, tmp_path, **changes):
    """A copy of the safetensors folder whose config.json has ``changes`` applied (None deletes a key)."""
    _, folders = saved
    folder = tmp_path / "changed"
    folder.mkdir()
    shutil.copy(folders["safetensors"] / "diffusion_pytorch_model.safetensors", folder)
    config = json.loads((folders["safetensors"] / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("field, value, theirs, ours", [
    ("freq_shift", 0, "0", "1"),
    ("flip_sin_to_cos", True, "True", "False"),
    ("norm_eps", 1e-5, "1e-05", "1e-06"),
    ("downsample_padding", 1, "1", "0"),
    ("norm_num_groups", 4, "4", "8"),
    ("layers_per_block", 1, "1", "2"),
    ("block_out_channels", [32, 32, 64, 64, 128, 256], "[32, 32, 64, 64, 128, 256]", "[32, 32, 64, 64, 128, 128]"),
    ("down_block_types", ["DownBlock2D"] * 3 + ["AttnDownBlock2D"] + ["DownBlock2D"] * 2, "AttnDownBlock2D", "DownBlock2D"),
    ("attention_head_dim", 8, "8", "null"),
])
def test_config_json_mismatch_names_field_and_values(saved, tmp_path, field, value, theirs, ours):
    folder = _folder_with_config(saved, tmp_path, **{field: value})
    with pytest.raises(UserError) as info:
        load_model(SMALL_CONFIG, folder)
    message = str(info.value)
    assert f"{field} is " in message and theirs in message and ours in message, message


def test_config_json_missing_fields_take_diffusers_defaults(saved, tmp_path):
    """An absent freq_shift means diffusers' default 0, which our embedding does not compute."""
    folder = _folder_with_config(saved, tmp_path, freq_shift=None)
    with pytest.raises(UserError, match="freq_shift is 0 there, 1 expected"):
        load_model(SMALL_CONFIG, folder)


def test_cli_refuses_mismatching_folder_in_one_line(saved, tmp_path, capsys):
    folder = _folder_with_config(saved, tmp_path, norm_eps=1e-5)
    images, _ = write_labelled_set(tmp_path / "data", n=2, size=SIZE)  # inputs are checked before the model loads
    code = cli.main(["--radius", "--config", _write_small_config(tmp_path), "--model_path", str(folder),
                     "--exp", str(tmp_path / "run"), "--data_dir", str(images), "--no_cache"])
    assert_one_error_line(code, capsys.readouterr().err, "norm_eps is 1e-05 there, 1e-06 expected")
    assert not (tmp_path / "run").exists()


def test_folder_for_an_adm_config_is_refused(saved):
    raw = json.loads(json.dumps(SMALL_CONFIG))
    raw["model"].update(type="adm", out_ch=6)
    with pytest.raises(UserError, match="model.type adm"):
        load_model(parse_config(raw), saved[1]["bin"])


def test_hub_id_offline_ends_in_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty huggingface_hub cache: one line, exit status 1."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "BOUNDARYDIFFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    images, _ = write_labelled_set(tmp_path / "data", n=2, size=256)  # inputs are checked before the model loads
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--radius", "--config", "celeba.yml", "--model_path",
                           "hf:google/ddpm-ema-celebahq-256", "--exp", str(tmp_path / "run"), "--data_dir", str(images)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, "hf:google/ddpm-ema-celebahq-256", "--model_path")
