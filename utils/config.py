"""Configuration: one YAML schema for every model family, parsed once into frozen dataclasses.

A config file has the sections ``data``, ``model``, ``diffusion`` (as in the original
repository's ``configs/celeba.yml``) plus this project's ``checkpoint`` and ``edit``. Unknown keys
are an error that names the key. The original's unused keys (``logit_transform``, ``training:``,
``sampling:``, ...) are accepted and ignored, so its config files still load.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import yaml

from utils.errors import UserError
from utils.io.files import read_capped

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
    parts_dir: str = ""  # where the data set's part masks are (masks_*.npz): --region mouth finds them there


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
    #: Sampling from noise (--unconditional's latents, sample quality) clips x0_hat to [-1, 1] at every
    #: step (DDPM's clip_denoised); edits and inversions never do.
    clip_x0: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Where users get the weights: file name, mirrors (URLs or ``gdrive:<id>``), known SHA-256."""
    filename: str = ""
    urls: tuple[str, ...] = ()
    sha256: str = ""
    path: str = ""  # a file shipped with the repository, relative to the repository root
    hub: str = ""   # one more mirror: a Hugging Face Hub repository in diffusers format, e.g. google/ddpm-ema-church-256


@dataclass(frozen=True)
class EditConfig:
    """Per-model defaults of the run-level flags (a flag given on the command line wins)."""
    t_0: int = 500
    n_inv_step: int = 40
    n_test_step: int = 40
    start_distance: float = -150.0
    end_distance: float = 150.0
    edit_img_number: int = 20
    attribute: str = ""  # the attribute an edit names when none is given (the web app opens on it)
    unit: str = "absolute"  # the unit of start_distance / end_distance and of --edit values: absolute or relative
    eta: float = 1.0  # DDIM eta of the edits (--eta; the original's 1: fresh noise; 0: deterministic)
    # A --region edit's range, -region_distance..+region_distance, where the command line gives none (0:
    # start_distance..end_distance, as a whole-image edit): the confined move puts the whole target into
    # the region's few values, so a whole-image range can saturate a small region into noise.
    region_distance: float = 0.0

    def default_range(self, region: bool) -> tuple[float, float]:
        """The range an edit takes when the command line names none: +-``region_distance`` for a
        region edit where the config sets one, else ``start_distance`` .. ``end_distance``."""
        if region and self.region_distance > 0:
            return -float(self.region_distance), float(self.region_distance)
        return self.start_distance, self.end_distance


#: The most distances (--edit_img_number, edit.edit_img_number) one run may ask for: every edit of
#: every image is held in memory until it is written, so a mistyped 100000000 would exhaust it.
MAX_EDIT_IMG_NUMBER = 1000


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


def latent_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes without batch of the two latents (docs/algorithm.md section 3): z = x_{t_0} and h, the
    middle-block output, e.g. {'z': (3, 256, 256), 'h': (512, 8, 8)} for the 256-px models."""
    config = parse_config(config)
    size, m = config.data.image_size, config.model
    side = size // 2 ** (len(m.ch_mult) - 1)
    return {"z": (m.in_channels, size, size), "h": (m.ch * m.ch_mult[-1], side, side)}


#: The most characters of a value that a message quotes.
QUOTE_CHARS = 40
_REPR = reprlib.Repr()  # (Python 3.11's takes no arguments)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 3, 3, 3, 3
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = QUOTE_CHARS


def quote(value: Any) -> str:
    """``repr(value)`` cut to about ``QUOTE_CHARS`` characters, without building the whole repr of a
    large or self-referencing value first (reprlib stops at a few items and levels)."""
    text = _REPR.repr(value)
    return text if len(text) <= QUOTE_CHARS + 5 else text[:QUOTE_CHARS] + "..."


def _build(cls, section: str, raw: Any, ignored: set[str] = frozenset()):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(f"config section '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in known and k not in ignored), key=str)
    if unknown:
        raise UserError(f"unknown key '{section}.{str(unknown[0])[:QUOTE_CHARS]}' in config (known: {', '.join(known)})")
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
    unknown = sorted((k for k in raw if k not in sections and k not in _IGNORED_SECTIONS), key=str)
    if unknown:
        raise UserError(f"unknown section {quote(unknown[0])} in config {name}")
    for required in ("data", "model", "diffusion"):
        if required not in raw:
            raise UserError(f"config {name} lacks the section '{required}'")
    model = _build(ModelConfig, "model", raw["model"], _IGNORED_MODEL_KEYS)
    model_type = {"simple": "ddpm"}.get(model.type, model.type) if isinstance(model.type, str) else model.type
    if model_type not in ("ddpm", "adm"):
        raise UserError(f"unknown model.type {quote(model.type)} (choices: ddpm, adm)")
    model = dataclasses.replace(model, type=model_type)
    edit = _build(EditConfig, "edit", raw.get("edit"))
    diffusion = _build(DiffusionConfig, "diffusion", raw["diffusion"])
    if diffusion.beta_schedule != "linear":
        raise UserError(f"diffusion.beta_schedule {quote(diffusion.beta_schedule)} is not supported (choices: linear)")
    return _validated(Config(
        name=raw.get("name", name),
        data=_build(DataConfig, "data", raw["data"], _IGNORED_DATA_KEYS),
        model=model,
        diffusion=diffusion,
        checkpoint=_build(CheckpointConfig, "checkpoint", raw.get("checkpoint")),
        edit=edit,
    ))


# --------------------------------------------------------------------------- validation
# Every value is checked for its type (from the dataclass annotations), then for its range and
# finiteness here, with one line that names the key. Keys without a rule get the type check only.
_RANGES: dict[str, tuple[float, float]] = {
    "data.image_size": (1, 4096), "data.channels": (1, 4), "model.in_channels": (1, 4), "model.out_ch": (1, 8),
    "model.ch": (1, 4096), "model.num_res_blocks": (0, 64), "model.dropout": (0, 1), "model.num_groups": (1, 4096),
    "model.num_head_channels": (-1, 4096), "model.ch_mult": (1, 64), "model.attn_resolutions": (1, 4096),
    "diffusion.beta_start": (0, 1), "diffusion.beta_end": (0, 1), "diffusion.num_diffusion_timesteps": (2, 100_000),
    "edit.t_0": (1, 100_000), "edit.n_inv_step": (2, 100_000), "edit.n_test_step": (2, 100_000),
    "edit.edit_img_number": (1, MAX_EDIT_IMG_NUMBER), "edit.start_distance": (-1e12, 1e12), "edit.end_distance": (-1e12, 1e12),
    "edit.region_distance": (0, 1e12),
}
_OPEN_BELOW = {"diffusion.beta_start", "diffusion.beta_end"}     # 0 excluded
_OPEN_ABOVE = {"model.dropout", "diffusion.beta_start", "diffusion.beta_end"}  # 1 excluded


class ConfigError(UserError, ValueError):
    """A config value of the wrong type, out of range or inconsistent with another (also a
    ValueError, as the model builders raise for a bad architecture)."""


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# A checkpoint's file name in the cache folder: a plain name (no folder part, not hidden: the
# cache's temporary files are hidden), so a download can only land inside the cache.
_CACHE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
_GDRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")
#: Schemes a checkpoint mirror may use: https, and http for a mirror without TLS (the SHA-256 and
#: the state-dict check guard what arrives). file:, data:, ftp: and the like are refused.
MIRROR_SCHEMES = ("https", "http")


def mirror_problem(url: str) -> str:
    """Why ``url`` cannot be a checkpoint mirror ('' when it can): https:// or http:// with a host,
    or ``gdrive:<file id>`` (fetched over https by gdown)."""
    if url.startswith("gdrive:"):
        return "" if _GDRIVE_ID.match(url[len("gdrive:"):]) else "a gdrive: mirror needs a Google Drive file id"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return "it contains white space or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme.lower() not in MIRROR_SCHEMES:
        return f"scheme '{parts.scheme or '(none)'}' is not allowed (only {', '.join(MIRROR_SCHEMES)} or gdrive:<id>)"
    if not parts.hostname:
        return "it names no host"
    return ""


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple["):
        inner = kind[len("tuple["):].split(",")[0].strip()
        return isinstance(value, tuple) and all(_type_ok(v, inner) for v in value)
    return True


def _check_value(key: str, value: Any, kind: str) -> None:
    names = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false",
             "tuple[int, ...]": "a list of integers", "tuple[str, ...]": "a list of text"}
    if not _type_ok(value, kind):
        raise ConfigError(f"config key '{key}' must be {names.get(kind, kind)}, got {quote(value)} ({type(value).__name__})")
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be finite, got {v}")
        if key in _RANGES:
            low, high = _RANGES[key]
            if not low <= v <= high or (key in _OPEN_BELOW and v == low) or (key in _OPEN_ABOVE and v == high):
                interval = f"{'(' if key in _OPEN_BELOW else '['}{low:g}, {high:g}{')' if key in _OPEN_ABOVE else ']'}"
                raise ConfigError(f"config key '{key}' must be in {interval}, got {quote(v)}")


def _validated(config: Config) -> Config:
    """``config`` if every value is of its type, finite and in range, and the values agree."""
    if not isinstance(config.name, str) or not _SAFE_NAME.match(config.name):
        raise ConfigError(f"config key 'name' must be a plain name (letters, digits, _ . -), got {quote(config.name)}")
    for section in ("data", "model", "diffusion", "checkpoint", "edit"):
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            _check_value(f"{section}.{f.name}", getattr(part, f.name), str(f.type))
    ck = config.checkpoint
    if ck.filename and (not _CACHE_FILE_NAME.match(ck.filename) or ck.filename.endswith(".sha256")):
        raise ConfigError(f"config key 'checkpoint.filename' must be a plain file name inside the cache folder "
                          f"(letters, digits, _ . + -; no folder part), got {quote(ck.filename)}")
    for url in ck.urls:
        problem = mirror_problem(url)
        if problem:
            raise ConfigError(f"config key 'checkpoint.urls' has a mirror that is refused: {quote(url)}: {problem}")
    d, m, diff, e = config.data, config.model, config.diffusion, config.edit
    if m.in_channels != d.channels:
        raise ConfigError(f"config key 'data.channels' is {d.channels}, but the model takes {m.in_channels} "
                        "(model.in_channels)")
    if m.out_ch not in (m.in_channels, 2 * m.in_channels):
        raise ConfigError(f"config key 'model.out_ch' must be {m.in_channels} or {2 * m.in_channels}, got {m.out_ch}")
    if not m.ch_mult:
        raise ConfigError("config key 'model.ch_mult' must not be empty")
    if d.image_size % 2 ** (len(m.ch_mult) - 1):
        raise ConfigError(f"config key 'data.image_size' must be divisible by {2 ** (len(m.ch_mult) - 1)} "
                        f"(one halving per model.ch_mult entry after the first), got {d.image_size}")
    if diff.beta_start > diff.beta_end:
        raise ConfigError(f"config key 'diffusion.beta_start' ({diff.beta_start}) must not exceed "
                        f"'diffusion.beta_end' ({diff.beta_end})")
    if not 0 <= e.eta <= 10:
        raise ConfigError(f"config key 'edit.eta' must be in [0, 10], got {e.eta}")
    if e.unit not in ("absolute", "relative"):
        raise ConfigError(f"config key 'edit.unit' must be absolute or relative, got {quote(e.unit)}")
    if e.t_0 > diff.num_diffusion_timesteps - 1:
        raise ConfigError(f"config key 'edit.t_0' must be in [1, {diff.num_diffusion_timesteps - 1}], got {e.t_0}")
    return config


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``--config`` names a file in ``configs/`` (``celeba.yml``) or is a path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / path
    if candidate.is_file():
        return candidate
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yml"))
    raise ConfigError(f"config '{name_or_path}' not found (neither a file nor one of configs/: {', '.join(shipped)})")


#: The largest config file read (the shipped ones are about 1 KiB).
MAX_CONFIG_BYTES = 1 << 20
_MAX_CONFIG_DEPTH = 16       # a config is sections of keys (and short lists): 3 levels
_MAX_CONFIG_DIGITS = 1000    # Python refuses to convert integers past 4300 digits
#: The largest a config may grow when its YAML aliases are expanded, in characters of its scalars
#: (plus one per value): what the largest file read holds without aliases. A "billion laughs" file
#: of a few hundred bytes would expand to gigabytes when copied or quoted.
MAX_CONFIG_EXPANDED = MAX_CONFIG_BYTES


def _yaml_problem(text: str) -> str:
    """What makes ``text`` unfit to be composed (nesting deeper than any config's, which would
    exhaust Python's recursion; an integer of more digits than Python converts; an alias inside
    the value it names, which would make the config contain itself; aliases that expand it beyond
    ``MAX_CONFIG_EXPANDED``), naming the field; '' if nothing does. Reads the event stream, which
    keeps no recursion of its own and expands no alias: each anchor's expanded size is summed as
    its value closes, and an alias adds its anchor's."""
    stack: list[list] = []  # per open collection: [kind, label, index or expecting-a-key, pending key, size, anchor]
    sizes: dict[str, int] = {}  # expanded size of each anchor whose value is complete
    total = 0

    def label_of_next() -> str:
        if not stack:
            return ""
        top = stack[-1]
        if top[0] == "seq":
            top[2] += 1
            return f"{top[1]}[{top[2] - 1}]"
        if top[2]:  # a key
            return ""
        return f"{top[1]}.{top[3]}" if top[1] else str(top[3])

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            closed = stack.pop()
            if closed[5] is not None:
                sizes[closed[5]] = closed[4]
            if stack:
                stack[-1][4] += closed[4]
            if stack and stack[-1][0] == "map":
                stack[-1][2] = True
            continue
        if not isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            continue
        is_key = bool(stack) and stack[-1][0] == "map" and stack[-1][2]
        label = label_of_next()
        if isinstance(event, yaml.AliasEvent):
            if any(entry[5] == event.anchor for entry in stack):
                return f"key '{label or '(top level)'}' refers to a value that holds it (alias *{event.anchor[:40]})"
            size = sizes.get(event.anchor, 1)  # an unknown anchor is the composer's to report
        elif isinstance(event, yaml.ScalarEvent):
            size = 1 + len(event.value)
        else:
            size = 1
        total += size
        if total > MAX_CONFIG_EXPANDED:
            return (f"key '{label or '(top level)'}' makes the config larger than {MAX_CONFIG_EXPANDED} characters "
                    "once its YAML aliases are expanded")
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            if stack:
                stack[-1][4] += size
            if isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
                sizes[event.anchor] = size
        if isinstance(event, yaml.ScalarEvent):
            if is_key:
                stack[-1][3], stack[-1][2] = event.value[:100], False
                continue
            digits = event.value.lstrip("+-").replace("_", "")
            if not event.style and len(digits) > _MAX_CONFIG_DIGITS and digits.isdigit():
                return f"key '{label or '(top level)'}' is an integer of {len(digits)} digits"
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if is_key:
                return "a key is a list or mapping"
            if len(stack) >= _MAX_CONFIG_DEPTH:
                return f"key '{label}' is nested more than {_MAX_CONFIG_DEPTH} levels deep"
            stack.append(["map" if isinstance(event, yaml.MappingStartEvent) else "seq", label, True, "", 1,
                          event.anchor])
            if stack[-1][0] == "seq":
                stack[-1][2] = 0
            continue
        if stack and stack[-1][0] == "map" and not is_key:
            stack[-1][2] = True
    return ""


def load_config(name_or_path: str | Path) -> Config:
    """The config file ``name_or_path``; a bad value is a ConfigError naming the key and the file."""
    path = resolve_config_path(name_or_path)
    try:
        data = read_capped(path, "config", MAX_CONFIG_BYTES)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    try:
        text = data.decode("utf-8")
        problem = _yaml_problem(text)
        if len(problem) > 200:
            problem = problem[:100] + "..." + problem[-60:]
        if problem:
            raise ConfigError(f"config {path}: {problem}")
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return parse_config(raw, name=path.stem)
    except UserError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{exc} (in {path})") from None
