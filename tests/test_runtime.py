"""models.runtime: the inference wrapper's precisions and layouts, and the allocator setting."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from models.runtime import InferenceNet, cpu_flags, default_batch_size
from tests.helpers import REPO, assert_one_error_line, tiny_model, tiny_net
from utils.errors import UserError


@pytest.mark.parametrize("kind", ["ddpm", "adm"])
def test_fp32_channels_last_matches_the_plain_model(kind):
    model = tiny_model(kind)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out, ref_h = model(x, torch.tensor([300, 40]))
    net = InferenceNet(tiny_model(kind), "fp32", channels_last=True)
    out, h = net(x, torch.tensor([300, 40]))
    assert out.dtype == h.dtype == torch.float32 and out.is_contiguous() and h.is_contiguous()
    for got, ref in ((out, ref_out), (h, ref_h)):
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_bf16_computes_in_bf16_and_returns_float32():
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp32_out, _ = tiny_net("ddpm")(x, 100)
    net = InferenceNet(tiny_model("ddpm"), "bf16")
    assert next(net.model.parameters()).dtype == torch.bfloat16
    out, h = net(x, 100)
    assert out.dtype == h.dtype == torch.float32
    rel = float((out - fp32_out).abs().max() / fp32_out.abs().max())
    assert 0 < rel < 0.1, rel  # really rounded to bf16, and still the same function


def test_h_override_is_cast_to_the_compute_dtype():
    net = InferenceNet(tiny_model("ddpm"), "bf16")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _, h = net(x, 100)
    out_same, _ = net(x, 100, h_override=h)
    out_moved, _ = net(x, 100, h_override=h + 1.0)
    assert out_same.dtype == torch.float32 and not torch.equal(out_same, out_moved)


def test_unknown_or_unsupported_precision_is_refused():
    model = tiny_model("ddpm")
    with pytest.raises(ValueError, match="unknown precision"):
        InferenceNet(model, "fp8")
    with pytest.raises(UserError, match="needs a CUDA GPU"):  # the user's to fix: one line, not an internal error
        InferenceNet(model, "fp16")


def test_default_batch_size_is_one_only_for_large_models_on_the_cpu():
    assert default_batch_size(torch.device("cpu"), 256) == 1
    assert default_batch_size(torch.device("cpu"), 16) == 8
    assert default_batch_size(torch.device("cuda"), 256) == 8


# Counts the page faults of three 64 MiB allocations before and after the setting, in a fresh
# process so that the setting does not leak into the rest of the suite.
_FAULTS = """
import resource, torch
from models.runtime import retain_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(1 << 24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
applied = retain_freed_memory()
settled = [faults() for _ in range(8)]  # the heap grows until freed blocks fit the next requests
print(before, applied, settled[-1])
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retain_freed_memory_stops_refaulting_large_blocks():
    result = subprocess.run([sys.executable, "-c", _FAULTS], cwd=REPO, capture_output=True, text=True, check=True)
    before, applied, after = result.stdout.split()
    assert applied == "True"
    assert int(before) > 3 * 10_000  # 16,384 pages of 4 KiB per allocation, each faulted in afresh
    assert int(after) < 1_000, after


def test_main_retains_freed_memory_before_any_work(monkeypatch, tmp_path, capsys):
    import main as cli
    import runners.boundary_diffusion as front_end

    calls = []
    monkeypatch.setattr(front_end, "retain_freed_memory", lambda: calls.append("retain") or True)
    code = cli.main(["--boundary_search", "--config", str(tmp_path / "missing.yml")])
    assert calls == ["retain"]
    assert_one_error_line(code, capsys.readouterr().err, "missing.yml")


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert cpu_flags(x86) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flags, warns", [({"avx2", "fma"}, True), ({"avx2", "avx512f", "avx512_bf16"}, False),
                                          ({"avx2", "amx_bf16", "amx_tile"}, False), (set(), False)])
def test_bf16_warns_once_where_it_is_emulated(monkeypatch, caplog, flags, warns):
    import models.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    runtime.warn_if_bf16_is_emulated.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="models.runtime"):
            for _ in range(2):
                InferenceNet(tiny_model("ddpm"), "bf16")
            tiny_net("ddpm")
        messages = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
        assert len(messages) == (1 if warns else 0), messages
    finally:
        runtime.warn_if_bf16_is_emulated.cache_clear()
