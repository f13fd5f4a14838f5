"""Configuration: one YAML schema for every model family, parsed once into frozen dataclasses.

A config file has the sections ``data``, ``model``, ``diffusion`` (as in the original
repository's ``configs/celeba.yml``) plus this project's ``checkpoint`` and ``edit``. Unknown keys
are an error that names the key. The original's unused keys (``logit_transform``, ``training:``,
``sampling:``, ...) are accepted and ignored, so its config files still load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import yaml

from utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Keys and sections of the original configs that this project does not use.
_IGNORED_DATA_KEYS = {"logit_transform", "uniform_dequantization", "gaussian_dequantization",
                      "random_flip", "rescaled", "num_workers"}
_IGNORED_MODEL_KEYS = {"ema_rate", "ema"}
_IGNORED_SECTIONS = {"training", "sampling", "optim"}


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    image_size: int
    channels: int = 3
    category: str = ""
    data_dir: str = ""   # default --data_dir (relative to the working directory)
    attr_file: str = ""  # default --attr_file
    align_face: bool = False  # default --align_face of --edit_image_boundary (FFHQ alignment, faces only)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``type`` is ``ddpm`` (alias ``simple``, the original's name) or ``adm``."""
    type: str
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float = 0.0
    var_type: str = "fixedsmall"
    resamp_with_conv: bool = True
    num_groups: int = 32
    # ADM (improved-DDPM) only
    num_head_channels: int = 64
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    beta_start: float
    beta_end: float
    num_diffusion_timesteps: int
    beta_schedule: str = "linear"


@dataclass(frozen=True)
class CheckpointConfig:
    """Where users get the weights: file name, mirrors (URLs or ``gdrive:<id>``), known SHA-256."""
    filename: str = ""
    urls: tuple[str, ...] = ()
    sha256: str = ""
    path: str = ""  # a file shipped with the repository, relative to the repository root


@dataclass(frozen=True)
class EditConfig:
    """Per-model defaults of the run-level flags (a flag given on the command line wins)."""
    t_0: int = 500
    n_inv_step: int = 40
    n_test_step: int = 40
    start_distance: float = -150.0
    end_distance: float = 150.0
    edit_img_number: int = 20


@dataclass(frozen=True)
class Config:
    name: str
    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    edit: EditConfig = field(default_factory=EditConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, section: str, raw: Any, ignored: set[str] = frozenset()):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(f"config section '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if k not in known and k not in ignored)
    if unknown:
        raise UserError(f"unknown key '{section}.{unknown[0]}' in config (known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        value = raw[name]
        if f.type.startswith("tuple") and value is not None:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [n for n, f in known.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise UserError(f"config section '{section}' lacks {', '.join(missing) or 'a value'}: {exc}") from None


def _to_plain(obj: Any) -> Any:
    """Nested namespaces (as the original code builds from YAML) to plain dicts."""
    if isinstance(obj, SimpleNamespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def parse_config(raw: Any, name: str = "config") -> Config:
    """A ``Config`` from a parsed YAML mapping (or a namespace of the same shape)."""
    if isinstance(raw, Config):
        return raw
    raw = _to_plain(raw)
    if not isinstance(raw, Mapping):
        raise UserError(f"config {name} is not a mapping")
    sections = {"data", "model", "diffusion", "checkpoint", "edit", "name"}
    unknown = sorted(k for k in raw if k not in sections and k not in _IGNORED_SECTIONS)
    if unknown:
        raise UserError(f"unknown section '{unknown[0]}' in config {name}")
    for required in ("data", "model", "diffusion"):
        if required not in raw:
            raise UserError(f"config {name} lacks the section '{required}'")
    model = _build(ModelConfig, "model", raw["model"], _IGNORED_MODEL_KEYS)
    model_type = {"simple": "ddpm"}.get(model.type, model.type)
    if model_type not in ("ddpm", "adm"):
        raise UserError(f"unknown model.type '{model.type}' (choices: ddpm, adm)")
    model = dataclasses.replace(model, type=model_type)
    edit = _build(EditConfig, "edit", raw.get("edit"))
    diffusion = _build(DiffusionConfig, "diffusion", raw["diffusion"])
    if diffusion.beta_schedule != "linear":
        raise UserError(f"diffusion.beta_schedule '{diffusion.beta_schedule}' is not supported (choices: linear)")
    return Config(
        name=str(raw.get("name", name)),
        data=_build(DataConfig, "data", raw["data"], _IGNORED_DATA_KEYS),
        model=model,
        diffusion=diffusion,
        checkpoint=_build(CheckpointConfig, "checkpoint", raw.get("checkpoint")),
        edit=edit,
    )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``--config`` names a file in ``configs/`` (``celeba.yml``) or is a path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / path
    if candidate.is_file():
        return candidate
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yml"))
    raise UserError(f"config '{name_or_path}' not found (neither a file nor one of configs/: {', '.join(shipped)})")


def load_config(name_or_path: str | Path) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_config(raw, name=path.stem)
