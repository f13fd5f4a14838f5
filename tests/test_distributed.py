"""Boundary search across processes: torchrun with 2 CPU processes (gloo) on the shipped digits
model against a single-process run, a rank killed mid-inversion, the resume; and the pure parts of
utils/distributed.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import main as cli
from scripts import make_digits as md
from tests.helpers import REPO
from utils import distributed as dist_utils
from utils.distributed import SINGLE, ProcessContext, context_from_env, shard, unshard, unshard_rows
from utils.errors import UserError

JOB_SECONDS = 240  # a 2-process job on 30 digits takes ~10-30 s on a loaded 2-core CPU
FAILURE_SECONDS = 120  # from the start of a job whose rank 1 dies to its end


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """The boundary-search arguments (30 digits, 3 batches per rank of 2) and a single-process run's boundaries."""
    root = tmp_path_factory.mktemp("dist")
    digits = md.make_digits(root)
    args = ["--boundary_search", "--config", "digits.yml", "--data_dir", str(digits / "images" / "train"),
            "--attr_file", str(digits / "list_attr_digits.txt"), "--edit_attr", "thick", "--n_train_img", "20",
            "--n_test_img", "10", "--n_inv_step", "10", "--bs_train", "5", "--verbose", "warning"]
    out = root / "single"
    assert cli.main([*args, "--exp", str(out / "run"), "--boundary_dir", str(out / "bd"),
                     "--cache_dir", str(out / "cache")]) == 0
    assert not torch.distributed.is_initialized()  # a plain run never sets up a process group
    return args, {s: out / "bd" / f"digits_thick_t200_{s}.npz" for s in ("h", "z")}


def torchrun(args: list[str], out: Path, script: Path = REPO / "main.py", timeout: float = JOB_SECONDS):
    """Run ``script`` in 2 CPU processes; (completed process, wall seconds). --standalone picks a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args, "--exp", str(out / "run"), "--boundary_dir", str(out / "bd"), "--cache_dir", str(out / "cache"),
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    return proc, time.perf_counter() - start


def assert_same_boundaries(found: Path, expected: dict[str, Path]) -> None:
    """Exactly the two boundary files, with the single-process normals (float32 SVM on latents whose
    network batches differ: equal within 1e-6, not bit for bit)."""
    assert sorted(p.name for p in found.iterdir()) == sorted(p.name for p in expected.values())
    for path in expected.values():
        with np.load(path) as want, np.load(found / path.name) as got:
            np.testing.assert_allclose(got["normal"], want["normal"], rtol=0, atol=1e-6)
            assert float(got["intercept"]) == pytest.approx(float(want["intercept"]), abs=1e-4)


def test_two_processes_fit_the_single_process_boundaries(search, tmp_path):
    args, single = search
    proc, _ = torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_boundaries(tmp_path / "bd", single)
    summary = json.loads((tmp_path / "run" / "boundary_search" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_per_rank"] == [15, 15]
    assert summary["cache_hits_per_rank"] == [0, 0]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 30  # every rank cached its own share
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["boundary_search"]  # one run folder, by rank 0


DYING_MAIN = """\
import os, signal, sys
from utils.io.latent_cache import LatentCache
import main

put = LatentCache.put
written = []

def put_then_die(self, key, z, h):
    put(self, key, z, h)
    written.append(key)
    if os.environ["RANK"] == "1" and len(written) == {after}:  # rank 1 is killed after its first batch
        os.kill(os.getpid(), signal.SIGKILL)

LatentCache.put = put_then_die
sys.exit(main.main())
"""


def test_a_killed_rank_fails_the_job_in_one_line_and_the_rerun_resumes(search, tmp_path):
    args, single = search
    script = tmp_path / "dying_main.py"
    script.write_text(DYING_MAIN.format(after=5))
    proc, seconds = torchrun(args, tmp_path, script)
    assert proc.returncode != 0
    assert seconds < FAILURE_SECONDS, seconds
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1, proc.stderr[-3000:]  # from rank 0; torchrun adds its own failure report
    assert "rerun the same command" in ours[0]
    assert not (tmp_path / "bd").exists() or not list((tmp_path / "bd").iterdir())
    assert not (tmp_path / "run" / "boundary_search" / "summary.json").exists()
    cached = len(list((tmp_path / "cache").rglob("*.pt")))
    assert 5 <= cached < 30
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    proc, _ = torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "boundary_search" / "summary.json").read_text())
    assert sum(summary["cache_hits_per_rank"]) == cached
    assert summary["cache_hits_per_rank"][1] >= 5
    assert_same_boundaries(tmp_path / "bd", single)


def test_unsharded_modes_refuse_to_run_under_torchrun(monkeypatch, capsys):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    code = cli.main(["--radius", "--config", "digits.yml", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--radius does not run across processes" in err
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------ pure parts
@given(n=st.integers(0, 50), world_size=st.integers(1, 8))
def test_shards_cover_every_item_once_balanced_and_unshard_restores_the_order(n, world_size):
    items = list(range(n))
    parts = [shard(items, r, world_size) for r in range(world_size)]
    assert sorted(i for p in parts for i in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert unshard(parts) == items


def test_shard_strides_so_a_partly_cached_prefix_is_spread_over_the_ranks():
    assert shard("abcdefg", 0, 3) == ["a", "d", "g"] and shard("abcdefg", 2, 3) == ["c", "f"]
    with pytest.raises(ValueError):
        shard("abc", 2, 2)


def test_unshard_refuses_parts_that_are_not_shards():
    with pytest.raises(ValueError, match="not shards"):
        unshard([[0, 2], [1, 3, 4]])


def test_gathered_rows_come_back_in_the_original_order():
    latents = torch.randn(7, 2, 3)
    parts = [latents[r::3] for r in range(3)]
    assert torch.equal(unshard_rows(parts), latents)
    assert torch.equal(unshard_rows([latents[:0], latents[:0]]), latents[:0])
    assert dist_utils.gather_to_main("x", SINGLE) == ["x"]  # a single process gathers its own result


def test_context_from_torchrun_environment():
    assert context_from_env({}) == SINGLE and not SINGLE.launched and SINGLE.is_main
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0"}
    process = context_from_env(env)
    assert process == ProcessContext(rank=3, world_size=4, local_rank=1, local_world_size=2, launched=True)
    assert not process.is_main
    with pytest.raises(UserError, match="inconsistent"):
        context_from_env({**env, "RANK": "4"})
    with pytest.raises(UserError, match="integers"):
        context_from_env({**env, "WORLD_SIZE": "two"})


def test_processes_on_one_machine_share_its_cores():
    process = ProcessContext(rank=0, world_size=4, local_rank=0, local_world_size=2, launched=True)
    assert dist_utils.cpu_threads(process, cores=16) == 8
    assert dist_utils.cpu_threads(process, cores=1) == 1
    assert dist_utils.local_device(torch.device("cpu"), process) == torch.device("cpu")


def test_two_processes_edit_a_folder_as_one_process_does(search, tmp_path):
    """A folder edit sharded over 2 processes writes the files a single process writes, with the
    same edits (seeds are per image and per edit; network batches differ, so within 1e-5)."""
    folder = tmp_path / "images"
    folder.mkdir()
    digits = sorted(Path(search[0][search[0].index("--data_dir") + 1]).glob("*.png"))[:5]  # 5: shards of 3 and 2
    for path in digits:
        (folder / path.name).write_bytes(path.read_bytes())
    args = ["--edit_image_boundary", "--config", "digits.yml", "--img_path", str(folder),
            "--boundary_z", str(REPO / "boundary" / "digits_thick_t200_z.npz"),
            "--boundary_h", str(REPO / "boundary" / "digits_thick_t200_h.npz"), "--n_inv_step", "10",
            "--n_test_step", "10", "--edit_img_number", "3", "--bs_train", "2", "--edit_batch_size", "4",
            "--save_tensors", "--verbose", "warning"]
    single = tmp_path / "single"
    assert cli.main([*args, "--exp", str(single), "--cache_dir", str(tmp_path / "single_cache")]) == 0
    proc, _ = torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = single / "edit", tmp_path / "run" / "edit"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_per_rank"] == [3, 2] and summary["failed"] == {}
    assert [i["folder"] for i in summary["images"]] == [p.stem for p in digits]
    for path in digits:
        files = sorted(p.name for p in (one / path.stem).iterdir())
        assert sorted(p.name for p in (two / path.stem).iterdir()) == files
        want = torch.load(one / path.stem / "tensors.pt", weights_only=True)
        got = torch.load(two / path.stem / "tensors.pt", weights_only=True)
        assert sorted(got) == sorted(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=f"{path.stem} {key}")
        assert json.loads((two / path.stem / "summary.json").read_text())["seeds"] == \
            json.loads((one / path.stem / "summary.json").read_text())["seeds"]


def test_two_processes_fit_every_attribute_as_one_process_does(search, tmp_path):
    """--edit_attr all under torchrun: the ranks share the Gram panels, rank 0 fits every attribute
    (issue 23); the boundary files and the atlas equal a single process's."""
    args, _ = search
    args = [a for a in args]
    for flag, value in (("--edit_attr", "all"), ("--n_train_img", "60"), ("--n_test_img", "20")):
        args[args.index(flag) + 1] = value
    single = tmp_path / "single"
    assert cli.main([*args, "--exp", str(single / "run"), "--boundary_dir", str(single / "bd"),
                     "--cache_dir", str(single / "cache")]) == 0
    proc, _ = torchrun(args, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {p.name: p for p in (single / "bd").iterdir()}
    assert len(expected) >= 4  # thick and slant at least; the digit classes have too few of a class here
    assert_same_boundaries(tmp_path / "two" / "bd", expected)
    atlases = [json.loads((root / "run" / "boundary_search" / "atlas.json").read_text())
               for root in (single, tmp_path / "two")]
    assert atlases[0]["attributes"] == atlases[1]["attributes"] and atlases[0]["skipped"] == atlases[1]["skipped"]
    for space in ("z", "h"):
        np.testing.assert_allclose(atlases[1]["cosines"][space], atlases[0]["cosines"][space], rtol=0, atol=1e-5)
