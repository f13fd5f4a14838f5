"""What the tests share besides fixtures: paths, tolerances, the tiny random-weight models and the
files they are run from, a small labelled image set, and the check of a one-line error.

The fixtures themselves live in ``tests/conftest.py`` and are built from these helpers."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from models import build_model, latent_shapes
from models.runtime import InferenceNet
from utils.config import parse_config
from utils.io.boundary_files import BoundaryRecord, save_boundary

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # facts the tests compare against, kept in the repository


# ------------------------------------------------------------------------------ facts and tolerances

def read_state_dict_tsv(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} from ``tests/data/<name>``: ``key<TAB>shape`` lines (shape like ``512x128``,
    empty for a scalar); ``#`` lines are comments."""
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition("\t")
        shape = shape.strip()
        shapes[key.strip()] = tuple(int(v) for v in shape.split("x")) if shape else ()
    return shapes


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    return float((a.double() - b.double()).abs().max())


def float_tolerance(dtype: torch.dtype, magnitude: float = 1.0, ulps: float = 8.0) -> float:
    """An absolute tolerance for results that may differ by the rounding of a few operations:
    ``ulps`` units in the last place of ``dtype`` at ``magnitude`` (the size of the values
    compared). Used where another kernel (another BLAS or convolution path, another batch
    composition) may round the same mathematics differently."""
    return float(torch.finfo(dtype).eps) * max(abs(magnitude), 1.0) * ulps


def sinusoid_tolerance(args: list[float]) -> torch.Tensor:
    """Per-value bound for a float32 sinusoid of ``args``: the frequency and the product t w carry
    a relative error of about 12 ulps (exp of an argument up to ln 10000 ~ 9.2, then one product),
    which sin / cos turn into an absolute error of |t w| * 12 eps, plus a few ulps of their own."""
    eps = torch.finfo(torch.float32).eps
    return torch.tensor([(abs(a) * 12 + 4) * eps for a in args], dtype=torch.float64)


# ----------------------------------------------------------------------------------- tiny models

TINY_MODELS = {
    "ddpm": {"type": "ddpm", "in_channels": 3, "out_ch": 3, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
             "attn_resolutions": [8], "dropout": 0.0, "var_type": "fixedsmall", "resamp_with_conv": True,
             "num_groups": 4},
    "adm": {"type": "adm", "in_channels": 3, "out_ch": 6, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
            "attn_resolutions": [8], "dropout": 0.0, "var_type": "learned_range", "num_head_channels": 8,
            "resblock_updown": True, "use_scale_shift_norm": True, "num_groups": 4},
}


def tiny_config(kind: str, name: str | None = None) -> dict:
    """The raw config (as read from YAML) of a tiny 16-px model of ``kind`` (ddpm or adm)."""
    return {
        "name": name or f"tiny_{kind}",
        "data": {"dataset": "synthetic", "image_size": 16, "channels": 3},
        "model": copy.deepcopy(TINY_MODELS[kind]),
        "diffusion": {"beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
        "edit": {"t_0": 300, "n_inv_step": 4, "n_test_step": 4, "start_distance": -20, "end_distance": 20,
                 "edit_img_number": 3},
    }


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.1^2) (zero-initialised layers included); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def random_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """build_model with every parameter drawn at random (zero-initialised layers included)."""
    torch.manual_seed(seed)
    return randomize_(build_model(config), seed)


def tiny_model(kind: str = "ddpm", seed: int = 0, name: str | None = None) -> torch.nn.Module:
    """The tiny model of ``kind`` with random weights drawn from ``seed``."""
    return random_model(tiny_config(kind, name), seed)


def tiny_net(kind: str = "ddpm", seed: int = 0) -> InferenceNet:
    """The tiny model wrapped as the tool runs a network: ``out, h = net(x, t, h_override=None)``,
    float32, no autograd."""
    return InferenceNet(tiny_model(kind, seed), "fp32")


def loaded_tiny_model(kind: str = "ddpm", name: str = "tiny_ed", seed: int = 0, sha256: str = "0" * 64):
    """The tiny network of ``kind`` as the engine holds a loaded model (``models.loading.LoadedModel``),
    without a checkpoint file: float32 on the CPU, its identity derived as ``load_model`` derives it."""
    from models.identity import model_identity
    from models.loading import LoadedModel
    from utils.core.diffusion import make_alphas_cumprod

    config = parse_config(tiny_config(kind, name=name))
    shapes = latent_shapes(config)
    return LoadedModel(config=config, checkpoint=Path("random.pt"), checkpoint_sha256=sha256,
                       net=tiny_net(kind, seed), alphas_cumprod=make_alphas_cumprod(0.0001, 0.02, 1000), shapes=shapes,
                       identity=model_identity(config, Path("random.pt"), sha256, shapes, "fp32", torch.device("cpu")))


def write_tiny_model(root: Path, kind: str = "ddpm", name: str | None = None, seed: int = 0) -> tuple[Path, Path, dict]:
    """root/tiny.yml and root/w.pt: the tiny model's config and random weights, as the command line
    reads them. Returns (config path, weights path, raw config)."""
    root.mkdir(parents=True, exist_ok=True)
    config = tiny_config(kind, name)
    cfg_path, weights = root / "tiny.yml", root / "w.pt"
    cfg_path.write_text(yaml.safe_dump(config))
    torch.save(random_model(config, seed).state_dict(), weights)
    return cfg_path, weights, config


# ---------------------------------------------------------------------------------------- inputs

def write_labelled_set(root: Path, n: int = 16, size: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """n images, half bright-left (attribute 'Bright_Left' = 1), half bright-right, plus a
    CelebA-format attribute file with that column and a constant one. Returns (image dir, attr file)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = 1 if i % 2 == 0 else -1
        arr = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
        half = slice(0, size // 2) if label == 1 else slice(size // 2, size)
        arr[:, half] += 150
        Image.fromarray(arr).save(img_dir / f"{i:06d}.png")
        rows.append(f"{i:06d}.jpg {label} 1")
    attr = root / "attrs.txt"
    attr.write_text(f"{n}\nBright_Left Always\n" + "\n".join(rows) + "\n")
    return img_dir, attr


def make_edit_setup(root: Path, attributes=("bright", "slanted"), n_images: int = 4, t_0: int = 300) -> dict:
    """The setting of the folder, conditional and picture tests, with no boundary search: the tiny
    DDPM (root/tiny.yml, root/w.pt), root/images/img{i}.png of random pixels, and random unit
    normals as boundary files root/bd/tiny_ed_<attr>_t<t_0>_<space>.npz (any number of attributes).

    Returns {"common": CLI args naming model, weights and boundary dir, "images": folder,
    "boundaries": {attr: {space: path}}, "config": Config}."""
    cfg_path, weights, config = write_tiny_model(root, "ddpm", name="tiny_ed", seed=3)
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)).save(images / f"img{i}.png")
    parsed = parse_config(config, name="tiny_ed")
    shapes = latent_shapes(parsed)
    boundaries = {}
    for a, attribute in enumerate(attributes):
        boundaries[attribute] = {}
        for space, shape in shapes.items():
            normal = np.random.default_rng(100 + 10 * a + len(space)).normal(size=int(np.prod(shape)))
            normal = (normal / np.linalg.norm(normal)).astype(np.float32)
            record = BoundaryRecord(normal=normal, coef=normal, intercept=0.0, shape=shape, space=space, t_0=t_0,
                                    n_inv_step=5, attribute=attribute, config_name="tiny_ed")
            boundaries[attribute][space] = save_boundary(root / "bd" / f"tiny_ed_{attribute}_t{t_0}_{space}.npz",
                                                         record)
    common = ["--config", str(cfg_path), "--model_path", str(weights), "--no_cache",
              "--boundary_dir", str(root / "bd"), "--t_0", str(t_0), "--n_inv_step", "5", "--n_test_step", "5",
              "--start_distance", "-20", "--end_distance", "20", "--edit_img_number", "3"]
    return {"common": common, "images": images, "boundaries": boundaries, "config": parsed}


# ------------------------------------------------------------------------------ one-line errors

_LOG_RECORD = re.compile(r"(DEBUG|INFO|WARNING) \S+: ")  # main.py's format: "LEVEL logger: message"
_PROGRESS_BAR = re.compile(r"\d+/\d+ \[")  # tqdm: "desc:  50%|#####     | 2/4 [00:01<00:01, ...]"


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are neither blank nor noise: log records below ERROR and
    progress bars (tqdm redraws with carriage returns, so ``\\r`` ends a line too)."""
    return [line for line in re.split(r"[\r\n]", stderr)
            if line.strip() and not _LOG_RECORD.match(line) and not _PROGRESS_BAR.search(line)]


def assert_one_error_line(code: int, stderr: str, *expected_words: str, exit_code: int = 1) -> str:
    """A run that failed as the tool promises: exit status ``exit_code``, no traceback, and stderr
    down to exactly one line (besides log records below ERROR and progress bars), ``error: ...``,
    not an internal error, holding each of ``expected_words``. Returns that line."""
    assert code == exit_code, f"exit status {code}, expected {exit_code}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "internal error" not in lines[0], lines[0]
    for word in expected_words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------ edits

def moves_along(distances, normal_z=None, normal_h=None):
    """(move_z, move_h) of ``iter_edits``: one attribute per space to K ``distances`` (None: that
    space is not moved)."""
    from utils.core.editing import LatentMove

    return tuple(None if n is None else LatentMove.along(n, distances) for n in (normal_z, normal_h))
