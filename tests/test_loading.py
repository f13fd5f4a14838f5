"""The one model-loading helper (models.loading.load_model) and the checkpoint forms it accepts:
state-dict files, safetensors, Hub ids (huggingface_hub replaced by a local stand-in: no network)."""
from __future__ import annotations

import ast
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import main as cli
from models.loading import load_model
from tests.helpers import REPO, assert_one_error_line, random_model, tiny_config, tiny_model
from models.checkpoints import fetch_hub, load_weights, locate_weights, resolve_checkpoint
from utils.config import parse_config
from utils.errors import UserError


def _reference_outputs(model, seed=0):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x, torch.tensor([5.0, 700.0]))


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".safetensors"])
def test_load_model_equals_build_and_load(kind, suffix, tmp_path, monkeypatch):
    """Meta-device build + memory-mapped read + assign gives the very network of a plain build and
    load, and runs no random initialisation."""
    config = tiny_config(kind)
    model = random_model(config, seed=5)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save({"state_dict": model.state_dict()}, path)

    def meta_only(original):  # initialisers run on the meta device cost nothing: no data
        def init(tensor, *args, **kwargs):
            assert tensor.is_meta, "load_model initialised real memory at random"
            return original(tensor, *args, **kwargs)
        return init
    for name in ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, meta_only(getattr(torch.nn.init, name)))
    loaded = load_model(config, path, channels_last=False)
    monkeypatch.undo()
    x, (out, h) = _reference_outputs(model)
    ours, ours_h = loaded.net(x, torch.tensor([5.0, 700.0]))
    assert torch.equal(ours, out) and torch.equal(ours_h, h)
    assert loaded.checkpoint == path and len(loaded.checkpoint_sha256) == 64
    assert loaded.alphas_cumprod.dtype == torch.float64 and loaded.alphas_cumprod.shape == (1000,)
    assert not any(p.is_meta or p.requires_grad for p in loaded.net.model.parameters())


def test_load_model_refuses_other_architecture_naming_keys(tmp_path):
    torch.save(tiny_model("ddpm").state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"does not fit this config's architecture: .*missing"):
        load_model(tiny_config("adm"), tmp_path / "w.pt")


def test_load_weights_reports_the_file_it_read(tmp_path):
    torch.save({"bias": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"w\.pt does not fit .*1 missing \(weight\)"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "w.pt")


def test_missing_safetensors_package_is_one_clear_error(tmp_path, monkeypatch):
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match="needs the safetensors package"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")


def test_diffusers_folder_without_safetensors_package_reads_the_bin(tmp_path, monkeypatch):
    for sub in ("", "unet"):
        folder = tmp_path / sub
        folder.mkdir(exist_ok=True)
    unet = tmp_path / "unet"
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"x")
    assert locate_weights(tmp_path).weights.name == "diffusion_pytorch_model.safetensors"
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    files = locate_weights(tmp_path)
    assert files.weights == unet / "diffusion_pytorch_model.bin" and files.diffusers_config == {}


def test_folder_that_is_no_diffusers_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a diffusers model folder"):
        locate_weights(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="sharded or variant files are not supported"):
        locate_weights(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "config.json").write_text("[1,")
    with pytest.raises(UserError, match="not valid JSON"):
        locate_weights(tmp_path)


def test_missing_huggingface_hub_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    code = cli.main(["--radius", "--img_path", "imgs/digit_example.png", "--config", "celeba.yml", "--model_path",
                     "hf:google/ddpm-ema-celebahq-256",
                     "--exp", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")])
    assert_one_error_line(code, capsys.readouterr().err, "pip install huggingface_hub", "--model_path")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["hf:", "hf:ddpm", "hf:a/b/c", "hf:/x"])
def test_malformed_hub_id(bad):
    with pytest.raises(UserError, match="not a Hub id"):
        resolve_checkpoint(parse_config(tiny_config("ddpm")), bad)


class FakeHub:
    """Stands in for huggingface_hub: serves files of local "repositories" (folders under root)."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        self.errors = types.ModuleType("huggingface_hub.utils")

        class EntryNotFoundError(Exception):
            pass

        class LocalEntryNotFoundError(FileNotFoundError, EntryNotFoundError):
            pass
        self.errors.EntryNotFoundError, self.errors.LocalEntryNotFoundError = EntryNotFoundError, LocalEntryNotFoundError
        self.module = types.ModuleType("huggingface_hub")
        self.module.hf_hub_download = self.download
        self.module.utils = self.errors
        self.offline = False

    def download(self, repo_id: str, filename: str) -> str:
        self.requests.append(f"{repo_id}/{filename}")
        if self.offline:
            raise self.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")
        path = self.root / repo_id / filename
        if not path.is_file():
            raise self.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "huggingface_hub", self.module)
        monkeypatch.setitem(sys.modules, "huggingface_hub.utils", self.errors)
        return self


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    unet = root / "org" / "pipeline" / "unet"  # files under unet/, as a pipeline repository has them
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (root / "org" / "empty").mkdir(parents=True)
    return FakeHub(root).install(monkeypatch)


def test_hub_id_resolves_to_the_cached_model_folder(hub):
    assert fetch_hub("org/pipeline") == hub.root / "org" / "pipeline" / "unet"
    assert hub.requests == ["org/pipeline/config.json", "org/pipeline/unet/config.json",
                            "org/pipeline/unet/diffusion_pytorch_model.safetensors"]
    with pytest.raises(UserError, match="holds no diffusers model"):
        fetch_hub("org/empty")
    hub.offline = True
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub .* not in the local cache"):
        fetch_hub("org/pipeline")


def test_config_hub_mirror_is_tried_after_the_urls(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    raw = tiny_config("ddpm")
    raw["checkpoint"] = {"filename": "tiny.ckpt", "urls": ["http://127.0.0.1:9/tiny.ckpt"], "hub": "org/pipeline"}
    assert resolve_checkpoint(parse_config(raw), cache_dir=tmp_path / "cache") == hub.root / "org" / "pipeline" / "unet"
    raw["checkpoint"] = {"hub": "org/empty"}
    with pytest.raises(UserError, match="hf:org/empty holds no diffusers model"):
        resolve_checkpoint(parse_config(raw))
    raw["checkpoint"] = {"filename": "tiny.ckpt", "urls": ["http://127.0.0.1:9/tiny.ckpt"], "hub": "org/empty"}
    with pytest.raises(UserError, match=r"could not download tiny.ckpt \(127.0.0.1:9: .*; hf:org/empty: .*--model_path"):
        resolve_checkpoint(parse_config(raw), cache_dir=tmp_path / "cache")


def test_shipped_configs_name_the_google_hub_mirrors():
    for name, repo in (("celeba", "google/ddpm-ema-celebahq-256"), ("church", "google/ddpm-ema-church-256"),
                       ("bedroom", "google/ddpm-ema-bedroom-256")):
        raw = yaml.safe_load((REPO / "configs" / f"{name}.yml").read_text())
        assert parse_config(raw).checkpoint.hub == repo


def test_utils_imports_nothing_from_models():
    for path in sorted((REPO / "utils").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "models" or n.startswith("models.") for n in names), f"{path.name} imports {names}"


def test_scripts_do_not_edit_sys_path():
    for path in sorted((REPO / "scripts").glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path; run it with python -m scripts.{path.stem}"


def test_pyproject_command_is_main():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["boundarydiffusion"] == "main:main"
    required = {line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]} == required
