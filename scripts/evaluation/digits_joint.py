"""The multi-attribute evaluation of the digits (``python -m scripts.evaluate_edits --joint``; issue 22,
docs/digits_report.md).

Thick and slant are moved on a K x K grid of targets (the joint move), thick alone, thick with slant
held, and slant with thick held, each with the digit's class free and held (the ``digit_c``
boundaries of each digit's true class c). Every edit is described by the engine (``Engine.describe``,
boundaries found by name in the boundary folder) and made by its editor; the measures come from the
pixels (``utils.core.morphometry``: stroke thickness and slant) with ``utils.core.edit_measures``:
target gain, leak, additivity, class kept, each with its spread over the digits. The latent
cross-talk (how far an edit moves the latents along slant's z normal) is read with the engine's
``EditDescription.source_distances`` from the edited latents the editor made.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from runners.engine import Config, Denoising, EditDescription, EditRequest, Move
from scripts.evaluation.common import EngineRunner, to_unit, z_distances
from utils.core.edit_measures import additivity_error, class_kept, leak, pooled_leak, spread, target_gain
from utils.core.morphometry import measure_batch

#: images (n, C, H, W) in [-1, 1] -> their classes (n,)
Classify = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class JointSetting:
    """The multi-attribute evaluation: ``moved`` (thick) is the attribute whose leak into ``other``
    (slant) is measured; both get the K targets spaced from ``start`` to ``end`` in ``unit``."""
    moved: str = "thick"
    other: str = "slant"
    start: float = -3.0
    end: float = 3.0
    k: int = 3
    unit: str = "relative"
    space: str = "both"
    h_policy: str = "lagged"
    eta: float = 0.0
    n_test_step: int = 5
    t_0: int = 200


#: The four edits of one variant: both attributes on a K x K grid (the joint move; edit i K + j at
#: value i of ``moved`` and j of ``other``), ``moved`` alone, ``moved`` with ``other`` held, and
#: ``other`` with ``moved`` held (the last two with the grid give the additivity).
JOINT_EDITS = ("grid", "single", "held", "other_held")


def joint_requests(setting: JointSetting, held: tuple[str, ...], seed: int, batch_size: int) -> dict[str, EditRequest]:
    """The requests of ``JOINT_EDITS``, every attribute named (the engine finds its files); every
    request also holds the attributes ``held`` (e.g. the digit's class, ``digit_3``)."""
    denoising = Denoising(setting.n_test_step, setting.eta, setting.h_policy, seed, batch_size)

    def move(name: str) -> Move:
        return Move(name, setting.start, setting.end)

    common = {"denoising": denoising, "k": setting.k, "space": setting.space, "unit": setting.unit}
    a, b = setting.moved, setting.other
    return {"grid": EditRequest((move(a), move(b)), held=held, grid=True, **common),
            "single": EditRequest((move(a),), held=held, **common),
            "held": EditRequest((move(a),), held=(b, *held), **common),
            "other_held": EditRequest((move(b),), held=(a, *held), **common)}


def describe_joint(runner: EngineRunner, setting: JointSetting, held: tuple[str, ...], seed: int,
                   batch_size: int) -> dict[str, EditDescription]:
    """The engine's descriptions of ``joint_requests``."""
    return {name: runner.describe(setting.t_0, request)
            for name, request in joint_requests(setting, held, seed, batch_size).items()}


def joint_measures(reference: torch.Tensor, edits: dict[str, torch.Tensor], targets: np.ndarray,
                   sigma: dict[str, float], classes: np.ndarray, classify: Classify) -> dict:
    """The multi-attribute measures of one variant, each per digit with its spread.

    reference: (N, C, H, W); edits: ``JOINT_EDITS`` -> (N, K', C, H, W) in [-1, 1] (grid: K' = K^2,
    the others K); targets: (K^2, 2) the grid's targets of (moved, other) in z; sigma: the spread of
    each measured attribute ("thickness", "slant") over the test digits; classify: the identity
    classifier, images -> classes."""
    n, k = len(reference), edits["single"].shape[1]
    measured = {name: {a: v.reshape(n, -1) for a, v in measure_batch(x.flatten(0, 1).numpy()).items()}
                for name, x in edits.items()}
    grid = measured["grid"]
    result = {"gain": {"thickness": spread(target_gain(grid["thickness"], targets[:, 0])),
                       "slant": spread(target_gain(grid["slant"], targets[:, 1])),
                       "slant_on_thick_target": spread(target_gain(grid["slant"], targets[:, 0]))}}
    sweeps = {"single": (measured["single"]["thickness"][:, None], measured["single"]["slant"][:, None]),
              "held": (measured["held"]["thickness"][:, None], measured["held"]["slant"][:, None]),
              # the grid's rows at one slant target each: thickness moves along i, the slant target is fixed
              "joint": (grid["thickness"].reshape(n, k, k).transpose(0, 2, 1),
                        grid["slant"].reshape(n, k, k).transpose(0, 2, 1))}
    result["leak"] = {name: {**spread(leak(t, sl, sigma["thickness"], sigma["slant"])),
                             "pooled": pooled_leak(t, sl, sigma["thickness"], sigma["slant"])}
                      for name, (t, sl) in sweeps.items()}
    result["thickness_gain"] = {name: spread(target_gain(t.reshape(n, -1), np.tile(np.arange(t.shape[2]), t.shape[1])))
                                for name, (t, _) in sweeps.items()}
    unit = {name: to_unit(x).numpy() for name, x in edits.items()}
    ref = to_unit(reference).numpy()
    errors = [additivity_error(ref, unit["held"][:, i], unit["other_held"][:, j], unit["grid"][:, i * k + j])
              for i in range(k) for j in range(k)]
    result["additivity"] = {m: spread(np.mean([e[m] for e in errors], axis=0)) for m in ("mean_abs", "relative")}
    kept = {name: class_kept(classify(x.flatten(0, 1)).reshape(n, -1), classes) for name, x in edits.items()}
    result["class_kept"] = {"single": spread(kept["single"]), "held": spread(kept["held"]), "joint": spread(kept["grid"])}
    return result


@dataclass(frozen=True)
class Across:
    """Where the unedited latents sit along ``other``'s z normal: ``probe`` (a z-only description of
    ``other``, ``EngineRunner.probe``), the values (N,) and their spread (the unit of the cross-talk)."""
    probe: EditDescription
    before: np.ndarray
    sd: float

    def moved(self, z: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        """|change of v.n| (n, K) along the normal of edited z latents (n, K, ...) of the digits
        ``rows``, in units of ``sd``."""
        after = z_distances(self.probe, z.flatten(0, 1)).reshape(len(rows), -1)
        return np.abs(after - self.before[rows, None]) / self.sd


def joint_variant(runner: EngineRunner, setting: JointSetting, free: dict[str, EditDescription], across: Across,
                  classes: np.ndarray, held_class: bool, seed: int, batch_size: int
                  ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], list[float]]:
    """One variant's edits: (``JOINT_EDITS`` -> (N, K', C, H, W), the cross-talk of "single" and
    "held" (N, K), the |cos| of moved and the class normal in z per class (none when the class is
    free)). With ``held_class`` every digit's own ``digit_c`` is held (one description per class)."""
    edits: dict[str, list] = {name: [None] * len(classes) for name in JOINT_EDITS}
    cross = {"single": np.zeros((len(classes), setting.k)), "held": np.zeros((len(classes), setting.k))}
    cosines = []
    groups = [(c, np.flatnonzero(classes == c)) for c in np.unique(classes)] if held_class else \
        [(None, np.arange(len(classes)))]
    for c, rows in groups:
        described = free if c is None else describe_joint(runner, setting, (f"digit_{c}",), seed, batch_size)
        if c is not None:
            cosines.append(described["single"].spaces["z"].cosines[0, 1])  # moved . digit_c
        for name, description in described.items():
            images, z = runner.edits_and_latents(setting.t_0, description, rows)
            for i, row in enumerate(rows):
                edits[name][row] = images[i]
            if name in cross:
                cross[name][rows] = across.moved(z, rows)
    return {name: torch.stack(v) for name, v in edits.items()}, cross, cosines


def run_joint(runner: EngineRunner, setting: JointSetting, classes: np.ndarray, classify: Classify, seed: int,
              batch_size: int) -> dict:
    """Both variants of the joint evaluation: the digit's class free, and held."""
    free = describe_joint(runner, setting, (), seed, batch_size)
    grid_z = free["grid"].spaces["z"]
    probe = runner.probe(setting.other, setting.t_0, space="z")
    before = z_distances(probe, runner.inversion(setting.t_0).z)
    across = Across(probe, before, float(np.std(before, ddof=1)))
    reference = runner.reference(setting.t_0, free["grid"])
    sigma = {a: float(v.std()) for a, v in measure_batch(runner.images.numpy()).items()}
    report = {"setting": dataclasses.asdict(setting), "sigma": sigma,
              "targets_z": grid_z.targets.tolist(),
              "targets_h": free["grid"].spaces["h"].targets.tolist() if "h" in free["grid"].spaces else None,
              "cosines_z": {"names": [*grid_z.attributes], "matrix": grid_z.cosines.tolist()},
              # the largest gain a K x K grid allows: its targets repeat (ties), a measurement cannot
              "gain_ceiling": float(target_gain(np.arange(len(grid_z.targets), dtype=float)[None],
                                                grid_z.targets[:, 0])[0]),
              "variants": {}}
    for variant in ("class free", "class held"):
        t0 = time.perf_counter()
        edits, cross, cosines = joint_variant(runner, setting, free, across, classes, variant == "class held", seed,
                                              batch_size)
        result = joint_measures(reference, edits, grid_z.targets, sigma, classes, classify)
        result["other_projection_moved"] = {name: spread(v.mean(axis=1)) for name, v in cross.items()}
        if cosines:
            result["abs_cos_moved_digit_z"] = spread(np.abs(cosines))
        result["seconds"] = time.perf_counter() - t0
        report["variants"][variant] = result
        print(f"joint, {variant}: leak single {result['leak']['single']['median']:.3f} held "
              f"{result['leak']['held']['median']:.3f} joint {result['leak']['joint']['median']:.3f}  "
              f"({result['seconds']:.0f}s)", flush=True)
    return report


def evaluate(runner: EngineRunner, args: argparse.Namespace, config: Config, classes: np.ndarray,
             classify: Classify) -> dict:
    """``--joint``: the joint setting from the flags (and the config's t_0), run."""
    setting = JointSetting(start=args.joint_range[0], end=args.joint_range[1], k=args.joint_k, space=args.space,
                           h_policy=args.h_policy, eta=args.joint_eta, n_test_step=args.joint_steps,
                           t_0=args.t_0 or config.edit.t_0)
    return run_joint(runner, setting, classes, classify, args.seed, args.batch_size)


def joint_table(report: dict) -> str:
    """The markdown table of ``run_joint``: one row per variant and edit."""
    def ms(d: dict, fmt: str = ".3f") -> str:
        return f"{d['mean']:{fmt}} ± {d['sd']:{fmt}}"

    def med(d: dict) -> str:
        return f"{d['median']:.3f} [{d['q25']:.3f}, {d['q75']:.3f}]"

    head = ["class", "edit", "thickness gain", "slant gain", "leak, median [IQR]", "leak, pooled",
            "slant projection moved", "additivity: mean abs", "additivity: relative", "class kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in report["variants"].items():
        for edit in ("single", "held", "joint"):
            grid = edit == "joint"
            cells = [variant, edit,
                     ms(r["gain"]["thickness"]) if grid else ms(r["thickness_gain"][edit]),
                     ms(r["gain"]["slant"]) if grid else "",
                     med(r["leak"][edit]), f"{r['leak'][edit]['pooled']:.3f}",
                     ms(r["other_projection_moved"][edit]) if edit in r["other_projection_moved"] else "",
                     ms(r["additivity"]["mean_abs"], ".4f") if grid else "",
                     ms(r["additivity"]["relative"]) if grid else "",
                     f"{r['class_kept'][edit]['mean']:.1%} ± {r['class_kept'][edit]['sd']:.1%}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
