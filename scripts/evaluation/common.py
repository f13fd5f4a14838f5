"""What every data set's evaluation shares: the engine-based runner, the one-attribute sweep
settings and their ablations, pixel helpers and the report's writing.

Every number an evaluation reports comes from edits the engine makes (``runners.engine``) exactly
as ``main.py --edit_image_boundary`` makes them: boundaries found by the engine's one rule
(``BoundaryIndex.find``), every edit described by ``Engine.describe`` and made by the editor of
``Engine.session`` (``Editor.edit_all`` / ``Editor.edits``), edit k of an image drawing its noise by
the command line's rule (seed key ``(image_key(image),)``), the reference reconstructions through
the edits' h injection (``Editor.reconstruct``) and fidelity from the plain inversion and
regeneration (``Editor.regenerate``). An evaluation measures the pixels; it decides nothing about
the edit.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from runners.engine import (SPACES, BoundaryRecord, Config, Denoising, EditDescription, EditRequest, Editor, Engine,
                            EngineOptions, Inversion, Inverting, LoadedModel, Move, SearchJob, UserError, image_key,
                            load_model, plan_search, retain_freed_memory)
from utils.io.files import write_bytes, write_json

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------- the runner

def evaluation_engine(model: LoadedModel, show_progress: bool | None = None) -> Engine:
    """The engine an evaluation edits with: no latent cache on disk (the runner keeps the
    inversions it needs); progress bars when stderr is a terminal unless ``show_progress`` says."""
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    return Engine(model, EngineOptions(cache_root=None, show_progress=progress))


class EngineRunner:
    """The evaluated images (N, C, H, W) in [-1, 1] through one ``Engine``: one editor per t_0 from
    ``Engine.session``, every image inverted once per t_0 (``Editor.invert``, kept here), every edit
    described by ``Engine.describe`` against the boundary folder's ``BoundaryIndex`` and seeded by the
    command line's rule."""

    def __init__(self, engine: Engine, images: torch.Tensor, n_inv_step: int, batch_size: int, boundary_dir: Path):
        self.engine, self.images, self.n_inv_step, self.batch_size = engine, images, n_inv_step, batch_size
        self.index = engine.boundary_index(boundary_dir)
        self.seed_keys = [(image_key(image),) for image in images]
        self._latents: dict[int, Inversion] = {}
        self._regenerated: dict[tuple[int, int], torch.Tensor] = {}

    def session(self, t_0: int) -> ContextManager[Editor]:
        return self.engine.session(t_0, self.n_inv_step)

    def subset(self, rows: Sequence[int]) -> "EngineRunner":
        """A runner of the images ``rows`` only, on the same engine, boundary folder and batch size,
        with the latents already inverted here (an image's latents, and its edits' seeds, depend on
        its pixels alone, not on the other images of the run)."""
        rows = list(rows)
        other = EngineRunner(self.engine, self.images[rows], self.n_inv_step, self.batch_size, self.index.folder)
        other._latents = {t: Inversion(latents.z[rows], latents.h[rows]) for t, latents in self._latents.items()}
        return other

    # ------------------------------------------------------------------ boundaries and descriptions
    def boundaries(self, attribute: str, t_0: int) -> dict[str, Path]:
        """{space: file} the engine edits ``attribute`` at ``t_0`` with (``BoundaryIndex.find``, the
        engine's one rule for the current file); UserError unless both spaces have one."""
        _, _, paths = self.index.find(attribute, t_0)
        missing = [s for s in SPACES if s not in paths]
        if missing:
            raise UserError(f"{attribute} has no {missing[0]} boundary at t_0 {t_0} in {self.index.folder}; the "
                            f"evaluation needs both spaces: run main.py --boundary_search --edit_attr {attribute} "
                            f"--t_0 {t_0}")
        return paths

    def header(self, path: Path) -> BoundaryRecord:
        """The header (no arrays) of a boundary file of the index."""
        return dict(self.index.scan)[path]

    def describe(self, t_0: int, request: EditRequest) -> EditDescription:
        """The engine's checked description of ``request`` at ``t_0`` (boundaries looked up by name)."""
        return self.engine.describe(request, t_0, self.n_inv_step, self.index)

    def probe(self, attribute: str, t_0: int, space: str = "both", unit: str = "absolute") -> EditDescription:
        """A one-edit description of ``attribute`` to the value 0 in ``unit``, never denoised: its
        ``source_distances`` place latents along the attribute's normals, and in the relative unit
        its target is the boundary's centre (midway between the class medians, in v.n)."""
        request = EditRequest((Move(attribute, 0.0, 0.0),), Denoising(2), k=1, space=space, unit=unit)
        return self.describe(t_0, request)

    # ------------------------------------------------------------------ images through the engine
    def inversion(self, t_0: int, rows: Sequence[int] | None = None) -> Inversion:
        """The latents at t_0 of the images ``rows`` (default: all), inverted once per t_0 in batches
        of ``batch_size``."""
        if t_0 not in self._latents:
            with self.session(t_0) as editor:
                self._latents[t_0] = editor.invert(self.images, self.batch_size)[0]
        latents = self._latents[t_0]
        return latents if rows is None else Inversion(latents.z[rows], latents.h[rows])

    def reference(self, t_0: int, description: EditDescription) -> torch.Tensor:
        """The reconstructions (N, C, H, W) the edits of ``description`` are compared with: through
        the edits' h injection (``Editor.reconstruct``)."""
        latents = self.inversion(t_0)
        with self.session(t_0) as editor:
            return editor.reconstruct(latents, description)

    def regeneration(self, t_0: int, n_test_step: int) -> torch.Tensor:
        """The plain inversion + regeneration (eta 0, no h injection, ``Editor.regenerate``) of every
        image (N, C, H, W): what fidelity is measured on."""
        key = (t_0, n_test_step)
        if key not in self._regenerated:
            latents = self.inversion(t_0)
            with self.session(t_0) as editor:
                self._regenerated[key] = editor.regenerate(latents, Denoising(n_test_step, batch_size=self.batch_size),
                                                           inject_h=False)
        return self._regenerated[key]

    def edits(self, t_0: int, description: EditDescription, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The edits (n, K, C, H, W) of the images ``rows`` (default: all), in [-1, 1], not clipped
        (``Editor.edit_all``)."""
        latents = self.inversion(t_0, rows)
        with self.session(t_0) as editor:
            return editor.edit_all(latents, description, self._keys(rows))

    def edits_and_latents(self, t_0: int, description: EditDescription, rows: Sequence[int] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``edits`` and the edited z latents before denoising (n, K, ...), from one pass of
        ``Editor.edits`` (the generator behind ``edit_all``)."""
        latents = self.inversion(t_0, rows)
        n, k = len(latents.z), len(description)
        images = z = None
        with self.session(t_0) as editor:
            for batch in editor.edits(latents, description, self._keys(rows)):
                if images is None:
                    images = torch.empty((n, k, *batch.images.shape[1:]), dtype=batch.images.dtype)
                    z = torch.empty((n, k, *batch.z.shape[1:]), dtype=batch.z.dtype)
                for j, (b, i) in enumerate(batch.items):
                    images[b, i], z[b, i] = batch.images[j], batch.z[j]
        return images, z

    def sample_images(self, t_0: int, x_T: torch.Tensor, n_steps: int, eta: float = 0.0, seed: int = 0
                      ) -> torch.Tensor:
        """Images denoised with DDIM from x_T (N, ...) over ``n_steps`` points (not an edit; eta > 0:
        fresh noise at each step, seeded from ``seed``, ``Editor.sample_images``)."""
        with self.session(t_0) as editor:
            return editor.sample_images(x_T, n_steps, self.batch_size, eta, seed)

    def _keys(self, rows: Sequence[int] | None) -> list[tuple[int, ...]]:
        return self.seed_keys if rows is None else [self.seed_keys[i] for i in rows]


def z_distances(probe: EditDescription, z: torch.Tensor) -> np.ndarray:
    """v.n of latents z (B, ...) along the z normal of the attribute of ``probe`` (a description that
    moves z only, ``EngineRunner.probe(..., space="z")``): (B,) float64, by the engine's
    ``EditDescription.source_distances`` (h is not read)."""
    if set(probe.spaces) != {"z"} or len(probe.attributes) != 1:
        raise ValueError("z_distances needs a description of one attribute that moves z only")
    rows = probe.source_distances(Inversion(z, torch.empty((len(z), 0))))
    return np.array([row["z"] for row in rows], dtype=np.float64)


def t_0_shift(runner: EngineRunner, attribute: str, t_0: int, reference_t_0: int) -> float:
    """How far the boundary of ``attribute`` moves along its z normal from ``reference_t_0`` to
    ``t_0``: the change of its centre, the value 0 of the engine's relative unit (midway between the
    class medians of its training latents, ``relative_scale``), which keeps a range centred on the
    classes as they move with t_0."""
    def centre(t: int) -> float:
        runner.boundaries(attribute, t)  # a missing boundary: the engine's message, naming what exists
        try:
            return runner.probe(attribute, t, space="z", unit="relative").distances("z")[0]
        except UserError as exc:  # the boundary has no usable class summary
            raise UserError(f"cannot shift the range to t_0 {t}: {exc}; or pass --no_shift_t0") from None
    return centre(t_0) - centre(reference_t_0)


# --------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Setting:
    """One evaluated configuration of a one-attribute edit."""
    name: str
    space: str = "both"
    h_policy: str = "lagged"
    eta: float = 1.0
    t_0: int = 400
    start: float | None = -20.0  # None: the command line's auto range per space (from the boundary files)
    end: float | None = 20.0
    k: int = 9


def setting_request(setting: Setting, attribute: str, n_test_step: int, seed: int, batch_size: int) -> EditRequest:
    """The command line's request for ``setting``: ``--edit_attr A --start_distance S --end_distance
    E`` (``auto`` when start is None)."""
    move = Move(attribute, setting.start, setting.end, auto=setting.start is None)
    return EditRequest((move,), Denoising(n_test_step, setting.eta, setting.h_policy, seed, batch_size),
                       k=setting.k, space=setting.space)


def ablations(default: Setting, t_0s: Sequence[int], scales: Sequence[float], shift: Callable[[int], float]
              ) -> list[Setting]:
    """The default with one setting changed at a time: the other spaces, the other h policy, the
    other eta (0 / 1), other t_0 values (the range moved by ``shift(t_0)``) and ranges scaled by
    ``scales`` about their centre."""
    replace = dataclasses.replace
    found = [replace(default, name=f"{space} only", space=space) for space in SPACES if space != default.space]
    if default.space != "both":
        found.append(replace(default, name="both", space="both"))
    other_policy = "once" if default.h_policy == "lagged" else "lagged"
    found.append(replace(default, name=f"h {other_policy}", h_policy=other_policy))
    other_eta = 0.0 if default.eta > 0 else 1.0
    found.append(replace(default, name=f"eta {other_eta:g}", eta=other_eta))
    for t in t_0s:
        if t != default.t_0:
            d = shift(t)
            found.append(replace(default, name=f"t_0 {t}", t_0=t, start=round(default.start + d, 2),
                                 end=round(default.end + d, 2)))
    centre, half = (default.start + default.end) / 2, (default.end - default.start) / 2
    found += [replace(default, name=f"range x{m:g}", start=centre - m * half, end=centre + m * half) for m in scales]
    return found


# --------------------------------------------------------------------------------- helpers

def add_output_flags(parser, batch_size: int) -> None:
    """The flags every evaluation shares: where its numbers go, its batches, seed, threads, precision."""
    from runners.engine import PRECISIONS

    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown table(s) here")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="images per network call")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the edit and sampling noise (the CLI's default)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="network precision")


def add_search_flags(parser) -> None:
    """The split of the shipped boundary search (``shipped_search``): its training and test faces."""
    parser.add_argument("--n_train_img", type=int, default=1000, help="the shipped search's training faces")
    parser.add_argument("--n_test_img", type=int, default=300, help="the shipped search's test faces (held out)")


def shipped_search(config: Config, attributes: str, args):
    """The images, labels and split of the boundary search that fitted the shipped boundaries
    (``plan_search``, as ``main.py --boundary_search --edit_attr attributes`` plans it): the config's
    data set and t_0, ``args.n_train_img`` / ``args.n_test_img`` (``add_search_flags``) and the
    split seed ``args.seed`` (the command line's default, as the shipped fit's)."""
    job = SearchJob(Inverting(config.edit.t_0, config.edit.n_inv_step), attributes, Path(config.data.data_dir),
                    Path(config.data.attr_file), None, None, args.n_train_img, args.n_test_img, 1.0, False,
                    args.boundary_dir, args.seed)
    return plan_search(job, job.data_dir, job.attr_file)


def load_evaluated_model(config: Config, model_path: Path | None, precision: str, threads: int) -> LoadedModel:
    """The model of ``config`` on ``threads`` CPU threads (large freed blocks kept for reuse)."""
    torch.set_num_threads(threads)
    retain_freed_memory()
    return load_model(config, model_path, precision=precision)


def subset_per_class(classes: np.ndarray, n: int | None, only: list[int] | None = None) -> np.ndarray:
    """Indices of the first ceil(n / #classes) items of each (selected) class, in name order."""
    chosen = sorted(set(classes.tolist()) if only is None else only)
    if n is None:
        return np.flatnonzero(np.isin(classes, chosen))
    per = -(-n // len(chosen))
    return np.sort(np.concatenate([np.flatnonzero(classes == c)[:per] for c in chosen]))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (not clipped) -> [0, 1], clipped."""
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def psnr(mse: float) -> float:
    return float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")


def shown_checkpoint(path: Path) -> str:
    """The checkpoint's path as reports show it: relative to the repository when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else path)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran the evaluation ``module`` (for its report)."""
    return " ".join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


def write_report(report: dict, table: str, json_path: Path | None, table_path: Path | None) -> None:
    """The report as JSON and its markdown table, where asked; the table is printed too."""
    if json_path:
        write_json(json_path, report)
    if table_path:
        write_bytes(table_path, table.encode())
    print(table)
    print(f"done in {report['seconds']:.0f}s")


def run_reporting_errors(run: Callable[..., int], *args) -> int:
    """``run(*args)``; a UserError (bad input) is one ``error:`` line on stderr and exit status 1."""
    try:
        return run(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
