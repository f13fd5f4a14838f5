"""Everything that touches disk or network: utils/config.py, images.py, checkpoints.py,
datasets.py, latent_cache.py, io.py."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pickle
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models.checkpoints import load_weights, read_state_dict, resolve_checkpoint
from utils.config import CONFIG_DIR, Config, load_config, parse_config, resolve_config_path
from utils.io.datasets import from_attr_file, read_attr_file
from utils.errors import UserError
from utils.io.images import load_image, save_image
from utils.io.latent_cache import LatentCache

# --------------------------------------------------------------------------- config


def _celeba_raw() -> dict:
    return yaml.safe_load((CONFIG_DIR / "celeba.yml").read_text())


def test_load_shipped_celeba_config():
    cfg = load_config("celeba.yml")
    assert isinstance(cfg, Config) and cfg.name == "celeba"
    assert cfg.model.type == "ddpm" and cfg.model.ch_mult == (1, 1, 2, 2, 4, 4), f"{cfg.model}"
    assert cfg.data.image_size == 256 and cfg.diffusion.num_diffusion_timesteps == 1000
    assert isinstance(cfg.checkpoint.urls, tuple) and cfg.checkpoint.filename == "celeba_hq.ckpt"


def test_load_shipped_afhq_config():
    cfg = load_config("afhq.yml")
    assert cfg.model.type == "adm" and cfg.model.out_ch == 6, f"{cfg.model}"


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yml"))
    assert names, "no shipped configs"
    for name in names:
        assert load_config(name).model.type in ("ddpm", "adm")


@pytest.mark.parametrize("section, key", [("model", "chanels"), ("data", "img_size"), ("diffusion", "beta_min"),
                                          ("edit", "t0")])
def test_unknown_key_is_named(section, key):
    raw = _celeba_raw()
    raw[section][key] = 1
    with pytest.raises(UserError, match=f"{section}.{key}"):
        parse_config(raw)


def test_unknown_section_is_named():
    raw = _celeba_raw()
    raw["modle"] = {}
    with pytest.raises(UserError, match="modle"):
        parse_config(raw)


def test_unknown_model_type_raises():
    raw = _celeba_raw()
    raw["model"]["type"] = "vqgan"
    with pytest.raises(UserError, match="vqgan"):
        parse_config(raw)


def test_simple_is_an_alias_of_ddpm():
    raw = _celeba_raw()
    raw["model"]["type"] = "simple"
    assert parse_config(raw).model.type == "ddpm"


def test_legacy_keys_are_accepted():
    raw = _celeba_raw()
    raw["data"]["logit_transform"] = False
    raw["data"]["random_flip"] = True
    raw["model"]["ema_rate"] = 0.9999
    raw["training"] = {"batch_size": 8}
    raw["sampling"] = {"batch_size": 4}
    cfg = parse_config(raw, name="celeba")
    assert cfg == load_config("celeba.yml"), f"legacy keys changed the config: {cfg}"


def test_config_to_dict_round_trips():
    for name in ("celeba.yml", "afhq.yml"):
        cfg = load_config(name)
        assert parse_config(cfg.to_dict()) == cfg, f"{name}: {parse_config(cfg.to_dict())} != {cfg}"
        # and through JSON, as the resolved config is written next to outputs (tuples become lists)
        assert parse_config(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_missing_config_lists_shipped_ones():
    with pytest.raises(UserError) as info:
        resolve_config_path("no_such_config.yml")
    msg = str(info.value)
    assert "no_such_config.yml" in msg and "celeba.yml" in msg and "afhq.yml" in msg, msg


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="YAML"):
        load_config(path)


# --------------------------------------------------------------------------- images

def _gray(v: np.ndarray) -> np.ndarray:
    """uint8 values -> the [-1, 1] floats load_image should give."""
    return v.astype(np.float64) / 255.0 * 2.0 - 1.0


def _check_tensor(x: torch.Tensor, channels: int, size: int):
    assert x.shape == (1, channels, size, size), f"shape {tuple(x.shape)}"
    assert x.dtype == torch.float32, f"dtype {x.dtype}"
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0, f"range [{float(x.min())}, {float(x.max())}]"


@pytest.mark.parametrize("channels", [1, 3])
def test_load_grayscale_png(tmp_path, channels):
    v = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(v, mode="L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", 8, channels)
    _check_tensor(x, channels, 8)
    for c in range(channels):
        np.testing.assert_allclose(x[0, c].numpy(), _gray(v), atol=1e-6)


def test_load_rgba_png_composites_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 255        # opaque red-ish
    arr[:4, :, 3] = 0                          # top half fully transparent
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 8, 3)
    _check_tensor(x, 3, 8)
    np.testing.assert_allclose(x[0, :, :4].numpy(), 1.0, atol=1e-6)     # transparent -> white
    np.testing.assert_allclose(x[0, 0, 4:].numpy(), _gray(np.array(200)), atol=1e-6)
    np.testing.assert_allclose(x[0, 1:, 4:].numpy(), -1.0, atol=1e-6)


def test_load_palette_png(tmp_path):
    img = Image.new("P", (8, 8))
    img.putpalette([10, 20, 30, 250, 128, 0] + [0] * 762)
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    img.putdata(idx.flatten().tolist())
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    x = load_image(tmp_path / "p.png", 8, 3)
    _check_tensor(x, 3, 8)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), _gray(np.array([10, 20, 30])), atol=1e-6)
    np.testing.assert_allclose(x[0, :, 0, 7].numpy(), _gray(np.array([250, 128, 0])), atol=1e-6)
    assert load_image(tmp_path / "p.png", 8, 1).shape == (1, 1, 8, 8)


def test_load_16bit_png_full_range(tmp_path):
    v = np.arange(256).reshape(16, 16)
    Image.fromarray((v * 257).astype(np.uint16)).save(tmp_path / "w.png")
    assert Image.open(tmp_path / "w.png").mode.startswith("I"), Image.open(tmp_path / "w.png").mode
    for channels in (1, 3):
        x = load_image(tmp_path / "w.png", 16, channels)
        _check_tensor(x, channels, 16)
        # v * 257 in 16 bits is exactly the 8-bit value v
        np.testing.assert_allclose(x[0, -1].numpy(), _gray(v), atol=1e-6)


def test_load_dark_16bit_png_is_not_stretched(tmp_path):
    # A 16-bit image whose values are at most 100 is dark: 100 / 65535 of full scale as 16-bit data,
    # or 100 / 255 if read as 8-bit data in a 16-bit container. Either way no pixel may come out
    # brighter than 100 / 255; stretching its maximum to white is wrong.
    v = (np.arange(64).reshape(8, 8) * 100 // 63).astype(np.uint16)
    Image.fromarray(v).save(tmp_path / "dark.png")
    x = load_image(tmp_path / "dark.png", 8, 1)
    assert float(x.max()) <= _gray(np.array(100)) + 1e-6, \
        f"brightest pixel {float(x.max())} (white is 1.0) for 16-bit values <= 100"


def test_load_resizes_and_center_crops(tmp_path):
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, 4:12] = 255  # the centre square is white, the side strips black
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 4, 3)
    _check_tensor(x, 3, 4)
    assert float(x.min()) > 0.9, f"the centre crop kept dark side pixels (min {float(x.min())})"


def _valid_png_bytes(tmp_path) -> bytes:
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "valid.png")
    return (tmp_path / "valid.png").read_bytes()


@pytest.mark.parametrize("kind", ["zero_bytes", "truncated", "text", "missing"])
def test_bad_image_files_raise_user_error_naming_path(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.png"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_valid_png_bytes(tmp_path)[:30])
    elif kind == "text":
        path.write_text("this is not an image\n")
    with pytest.raises(UserError) as info:
        load_image(path, 8, 3)
    assert str(path) in str(info.value), f"message does not name the file: {info.value}"


def test_truncated_png_body_raises_user_error(tmp_path):
    data = _valid_png_bytes(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    big = (tmp_path / "big.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(big[: len(big) // 2])
    with pytest.raises(UserError, match="cut.png"):
        load_image(path, 64, 3)
    # The failed load touched neither file, and the valid one next to it still loads, as written.
    assert (tmp_path / "valid.png").read_bytes() == data and (tmp_path / "cut.png").read_bytes() == big[: len(big) // 2]
    valid = load_image(tmp_path / "valid.png", 8, 3)
    assert valid.shape == (1, 3, 8, 8) and torch.allclose(valid, torch.full_like(valid, 7 / 127.5 - 1), atol=1e-6)


def test_save_then_load_is_uint8_exact(tmp_path):
    u = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    x = torch.from_numpy(u.astype(np.float32) / 127.5 - 1.0)
    save_image(x, tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"], f"folder holds {os.listdir(tmp_path)}"
    y = load_image(tmp_path / "out.png", 8, 3)[0]
    back = ((y + 1) * 127.5).round().to(torch.uint8).numpy()
    # Exact on any CPU: k / 127.5 - 1 and back are float32 elementwise operations (IEEE rounded, the
    # same in every vector unit) whose error stays far below the 0.5 that rounding removes.
    assert np.array_equal(back, u), f"{int((back != u).sum())} values differ"


# --------------------------------------------------------------------------- checkpoints

class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


@pytest.mark.parametrize("content", [b"", b"hello world", b"a,b\n1,2\n", bytes(range(256)),
                                     b"<!DOCTYPE html><html><body>quota exceeded</body></html>", "truncated"],
                         ids=["empty", "text", "csv", "binary", "html", "truncated"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path, content):
    path = tmp_path / "w.pt"
    if content == "truncated":
        torch.save({"w": torch.zeros(100)}, path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(UserError, match="w.pt"):
        read_state_dict(path)
    with pytest.raises(UserError):
        load_weights(torch.nn.Linear(2, 2), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_code_executing_checkpoint_is_refused_and_not_run(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2, 2), "bias": _Marker(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    for loader in (read_state_dict, lambda p: load_weights(torch.nn.Linear(2, 2), p)):
        with pytest.raises(UserError):
            loader(path)
        assert not marker.exists(), "loading the checkpoint executed its pickle"


def test_read_state_dict_unwraps_and_strips_module_prefix(tmp_path):
    model = torch.nn.Linear(2, 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pt")
    state = read_state_dict(tmp_path / "w.pt")
    assert sorted(state) == ["bias", "weight"], f"keys {sorted(state)}"
    fresh = torch.nn.Linear(2, 3)
    load_weights(fresh, tmp_path / "w.pt")
    assert torch.equal(fresh.weight, model.weight)  # stored and loaded, not computed: exact


def test_load_weights_names_missing_key(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    state = model.state_dict()
    del state["1.bias"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"1\.bias"):
        load_weights(model, tmp_path / "w.pt")


def test_load_weights_names_mis_shaped_key(tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="weight"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "w.pt")


def _ckpt_config(urls, filename="tiny.ckpt", sha256="") -> Config:
    return parse_config({
        "name": "tiny",
        "data": {"dataset": "x", "image_size": 8},
        "model": {"type": "ddpm", "in_channels": 3, "out_ch": 3, "ch": 8, "ch_mult": [1], "num_res_blocks": 1,
                  "attn_resolutions": []},
        "diffusion": {"beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
        "checkpoint": {"filename": filename, "urls": list(urls), "sha256": sha256},
    })


def test_resolve_checkpoint_missing_model_path(tmp_path):
    with pytest.raises(UserError, match="nothere.pt"):
        resolve_checkpoint(_ckpt_config([]), model_path=tmp_path / "nothere.pt", cache_dir=tmp_path)


def test_resolve_checkpoint_model_path_wins(tmp_path):
    (tmp_path / "mine.pt").write_bytes(b"x")
    assert resolve_checkpoint(_ckpt_config([]), model_path=tmp_path / "mine.pt") == tmp_path / "mine.pt"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path.startswith("/short/"):
            # promises 1000 bytes, sends 10, closes: a download cut off midway
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(served folder, base URL, list of requested paths): a threaded server on 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", server.paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_resolve_checkpoint_downloads_records_hash_and_detects_tampering(tmp_path, http_root):
    root, base, paths = http_root
    torch.save({"w": torch.randn(32, 32)}, root / "tiny.ckpt")  # a download must read as a state dict
    content = (root / "tiny.ckpt").read_bytes()
    cache = tmp_path / "cache"
    cfg = _ckpt_config([f"{base}/missing.ckpt", f"{base}/tiny.ckpt"])  # first mirror 404s, second works
    path = resolve_checkpoint(cfg, cache_dir=cache)
    assert path == cache / "tiny.ckpt" and path.read_bytes() == content
    recorded = (cache / "tiny.ckpt.sha256").read_text().strip()
    assert recorded == hashlib.sha256(content).hexdigest(), f"recorded {recorded}"
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.ckpt", "tiny.ckpt.sha256"], sorted(os.listdir(cache))
    # a second call uses the cache
    n_requests = len(paths)
    assert resolve_checkpoint(cfg, cache_dir=cache) == path and len(paths) == n_requests, paths
    # tampering is detected against the recorded hash
    path.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    with pytest.raises(UserError, match="SHA-256"):
        resolve_checkpoint(cfg, cache_dir=cache)


def test_resolve_checkpoint_checks_config_hash(tmp_path, http_root):
    root, base, _ = http_root
    (root / "tiny.ckpt").write_bytes(b"weights")
    cfg = _ckpt_config([f"{base}/tiny.ckpt"], sha256="0" * 64)
    with pytest.raises(UserError, match="SHA-256"):
        resolve_checkpoint(cfg, cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # the wrong file is not kept


def test_resolve_checkpoint_unreachable_url(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="--model_path"):
        resolve_checkpoint(_ckpt_config(["http://127.0.0.1:9/x.ckpt"]), cache_dir=cache)
    left = sorted(os.listdir(cache)) if cache.exists() else []
    assert left == [], f"the failed download left {left}"


def test_resolve_checkpoint_no_mirrors(tmp_path):
    with pytest.raises(UserError, match="--model_path"):
        resolve_checkpoint(_ckpt_config([]), cache_dir=tmp_path / "cache")


def test_resolve_checkpoint_cut_off_download_is_not_kept(tmp_path, http_root):
    # The server promises 1000 bytes and sends 10: the download is incomplete and must neither
    # be kept in the cache nor have its hash recorded as the truth.
    _, base, _ = http_root
    cache = tmp_path / "cache"
    with pytest.raises(UserError):
        resolve_checkpoint(_ckpt_config([f"{base}/short/tiny.ckpt"]), cache_dir=cache)
    left = sorted(os.listdir(cache)) if cache.exists() else []
    assert left == [], f"the cut-off download left {left}"


# --------------------------------------------------------------------------- datasets

ATTR_TEXT = (
    "4\n"
    "Smiling Male Eyeglasses\n"
    "000001.jpg  1 -1  0\n"
    "000002.jpg -1  1  1\n"
    "000003.jpg  0  1 -1\n"
    "000005.jpg  1  1  1\n"
)


def _attr_setup(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000001.png", "000002.jpg", "000003.png", "000004.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    attr = tmp_path / "list_attr.txt"
    attr.write_text(ATTR_TEXT)
    return images, attr


def test_read_attr_file(tmp_path):
    _, attr = _attr_setup(tmp_path)
    names, rows = read_attr_file(attr)
    assert names == ["Smiling", "Male", "Eyeglasses"], names
    assert sorted(rows) == ["000001.jpg", "000002.jpg", "000003.jpg", "000005.jpg"], sorted(rows)
    assert rows["000001.jpg"].tolist() == [1, -1, 0] and rows["000002.jpg"].tolist() == [-1, 1, 1]


def test_from_attr_file_matches_by_name_and_stem(tmp_path):
    images, attr = _attr_setup(tmp_path)
    data = from_attr_file(images, attr, "smiling")  # case-insensitive
    # 000001.png matches row 000001.jpg by stem; 000002.jpg by name; 000003 is labelled 0 (left
    # out); 000004 has no row; 000005 has no image
    assert [p.name for p in data.paths] == ["000001.png", "000002.jpg"], [p.name for p in data.paths]
    assert data.labels.tolist() == [1, 0] and data.labels.dtype == np.int64, data.labels
    glasses = from_attr_file(images, attr, "EYEGLASSES")
    assert [p.name for p in glasses.paths] == ["000002.jpg", "000003.png"] and glasses.labels.tolist() == [1, 0]


def test_from_attr_file_unknown_attribute_lists_names(tmp_path):
    images, attr = _attr_setup(tmp_path)
    with pytest.raises(UserError) as info:
        from_attr_file(images, attr, "Blond_Hair")
    msg = str(info.value)
    assert "Blond_Hair" in msg and "Smiling" in msg and "Eyeglasses" in msg, msg


@pytest.mark.parametrize("text", ["1\nA B\nx.jpg 1\n", "1\nA\nx.jpg 2\n", "1\nA\nx.jpg yes\n", "1\n"])
def test_bad_attr_file_is_a_user_error(tmp_path, text):
    path = tmp_path / "attr.txt"
    path.write_text(text)
    with pytest.raises(UserError):
        read_attr_file(path)


# --------------------------------------------------------------------------- latent cache

def _cache(tmp_path, **identity):
    return LatentCache(tmp_path / "latents", {"config": "tiny", "sha": "ab", "t_0": 300, "steps": 4, **identity})


def test_latent_cache_round_trip(tmp_path):
    cache = _cache(tmp_path)
    image = torch.linspace(-1, 1, 48).reshape(3, 4, 4)
    key = cache.key(image)
    assert cache.get(key) is None
    z, h = torch.randn(3, 4, 4), torch.randn(8, 2, 2)
    cache.put(key, z, h)
    got = cache.get(key)
    assert got is not None and torch.equal(got.z, z) and torch.equal(got.h, h)  # stored, not computed: exact
    files = [p.name for p in (tmp_path / "latents").rglob("*") if p.is_file()]
    assert files == [f"{key}.pt"], f"cache holds {files}"


def test_latent_cache_key_depends_on_identity_and_image(tmp_path):
    image = torch.zeros(3, 4, 4)
    k = _cache(tmp_path).key(image)
    assert _cache(tmp_path).key(image) == k
    assert _cache(tmp_path, t_0=301).key(image) != k
    assert _cache(tmp_path, sha="cd").key(image) != k
    other = image.clone()
    other[0, 0, 0] = 1e-3
    assert _cache(tmp_path).key(other) != k
    assert _cache(tmp_path).key(image.reshape(3, 2, 8)) != k


@pytest.mark.parametrize("content", [b"", b"hello world", bytes(range(256)), "truncated", "not_a_dict"],
                         ids=["empty", "text", "binary", "truncated", "not_a_dict"])
def test_latent_cache_corrupt_entry_reads_as_none(tmp_path, content):
    cache = _cache(tmp_path)
    key = cache.key(torch.zeros(3, 4, 4))
    cache.put(key, torch.zeros(3, 4, 4), torch.zeros(8, 2, 2))
    path = next((tmp_path / "latents").rglob("*.pt"))
    if content == "truncated":
        content = path.read_bytes()[:100]
    elif content == "not_a_dict":
        torch.save([torch.zeros(1)], path)
        content = path.read_bytes()
    path.write_bytes(content)
    assert cache.get(key) is None


# --------------------------------------------------------------------------- run folders

# (run folders: tests/test_hostile.py)
