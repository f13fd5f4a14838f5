"""The faces evaluation's studies beyond one attribute at a time (``scripts/evaluation/faces.py``):

- entanglement (``--entanglement``): for pairs of attributes whose fitted z normals have
  |cos| >= ``HOLD_THRESHOLD`` (0.3; or the pairs of ``--pairs A/B``), the first attribute A is
  edited over ``--entanglement_k`` targets of the run's range on the first ``--entanglement_n``
  test faces: alone ("single"), with B held ("held": ``EditRequest(held=(B,), force=True)``, the
  hold ratio of the engine's description reported), and, in a one-space run, with B moved to each
  face's own position ("joint": the hold expressed as a target, one description per face; the
  engine's joint move then equals the hold, so its pixels match "held" up to rounding). The
  leak into B: per face, sum_k |s_B,k - mean_k s_B| / sd_B over sum_k |s_A,k - mean_k s_A| / sd_A
  (scores of the predictor, sd over the test faces; ``utils.core.edit_measures.leak``), with its
  spread and pooled over the faces; the reduction by the hold: 1 - held / single, pooled and per
  face. A's own control: Spearman's rank correlation of s_A with the targets (``target_gain``).
  With both spaces moved, a request gives B one target for z and h together, which cannot be
  each face's own position in both, so "joint" needs ``--entanglement_space z`` (or h).
- ablations (``--ablations``): z only, h only and both, at the run's t_0 and at each t_0 of
  ``--ablate_t0`` (default: every t_0 with boundaries of the ablation attributes), and the run's
  setting with the other eta (0 for 1: how much of the change is the edits' fresh noise), on
  ``--ablation_attributes`` and the first ``--ablation_per_side`` faces per side; at another t_0
  an absolute range is shifted by the change of each attribute's z boundary centre
  (``common.t_0_shift``; not with ``--no_shift_t0``). Reported per setting: success, the share of
  edits that moved the score toward the other side by more than the noise, nuisance kept; for
  h only, whether it moves the attributes at each t_0; the t_0 with the most successful edits
  with the nuisance kept, beside the mixing step t_m of ``--radius_json`` (``main.py --radius``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from runners.engine import HOLD_THRESHOLD, SPACES, Denoising, EditRequest, Move, UserError
from scripts.evaluation.common import t_0_shift
from scripts.evaluation.faces_measures import Sweep, canonical, sweep_measures
from scripts.evaluation.faces_runs import FaceRunner, FaceSetting, Progress, edit_request
from utils.core.edit_measures import leak, pooled_leak, spread, target_gain
from utils.faces.factors import ATTRIBUTES, attribute_scores
from utils.faces.predictor import PREDICTED_NAMES
from utils.io.files import read_json

#: Below this p of the sign test, edits move the attribute toward the intended side (``directed``).
SIGN_TEST_P = 0.01
#: The attributes the ablations edit by default (those with boundaries): one per kind of change.
ABLATION_ATTRIBUTES = ("Smiling", "Eyeglasses", "Gray_Hair", "Young")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entanglement", action="store_true", help="also the single / held / joint pair edits")
    parser.add_argument("--pairs", nargs="*", default=None, metavar="A/B",
                        help="--entanglement: the pairs (A edited, B held) instead of those with |cos z| >= "
                             f"{HOLD_THRESHOLD:g}")
    parser.add_argument("--max_pairs", type=int, default=6, help="--entanglement: at most this many pairs "
                                                                 "(largest |cos| first)")
    parser.add_argument("--entanglement_n", type=int, default=20, help="--entanglement: faces edited per pair")
    parser.add_argument("--entanglement_k", type=int, default=3, help="--entanglement: targets of the first attribute")
    parser.add_argument("--entanglement_space", choices=("both", *SPACES), default=None,
                        help="--entanglement: latents moved (default: --space; joint needs z or h)")
    parser.add_argument("--ablations", action="store_true", help="also z only / h only / both at each t_0")
    parser.add_argument("--ablation_attributes", default=None,
                        help=f"A,B,...: attributes of the ablations (default: {', '.join(ABLATION_ATTRIBUTES)})")
    parser.add_argument("--ablation_per_side", type=int, default=6, help="--ablations: faces per attribute and side")
    parser.add_argument("--ablate_t0", type=int, nargs="*", default=None,
                        help="--ablations: other t_0 values (default: every t_0 with boundaries)")
    parser.add_argument("--no_shift_t0", action="store_true",
                        help="--ablations: keep an absolute range at other t_0 (default: shift it by the change of "
                             "the z boundary's centre)")
    parser.add_argument("--radius_json", type=Path, default=None,
                        help="radius.json of main.py --radius: its t_m is reported beside the best t_0")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The studies' flags, checked (argparse's message and exit on a bad one)."""
    for text in args.pairs or ():
        if text.count("/") != 1 or not all(part.strip() for part in text.split("/")):
            parser.error(f"--pairs takes A/B, got {text!r}")
    if args.entanglement_n < 1 or args.entanglement_k < 2 or args.max_pairs < 1 or args.ablation_per_side < 1:
        parser.error("--entanglement_n, --max_pairs and --ablation_per_side must be at least 1, --entanglement_k 2")


@dataclass(frozen=True)
class EntanglementPlan:
    """The pairs to edit (A edited, B held) in ``study``, on the faces ``rows``, and every pair's cosines."""
    study: FaceSetting
    cosines: list[dict]
    pairs: list[tuple[str, str]]
    rows: np.ndarray

    @property
    def variants(self) -> int:
        return 2 if self.study.space == "both" else 3

    def calls(self) -> int:
        return len(self.pairs) * self.variants * len(self.rows) * self.study.k * self.study.n_test_step


@dataclass(frozen=True)
class AblationPlan:
    """The ablation attributes, t_0 values, each attribute's faces (``rows`` of the run, all of them
    ``faces``), the runs: (attribute, setting, whether it is the run's own setting), and the run's
    inversion steps and eta."""
    attributes: list[str]
    t_0s: list[int]
    rows: dict[str, np.ndarray]
    faces: np.ndarray
    runs: list[tuple[str, FaceSetting, bool]]
    n_inv_step: int
    eta: float

    def calls(self) -> int:
        edits = sum(len(self.rows[a]) * s.k * s.n_test_step for a, s, own in self.runs if not own)
        return edits + len(self.faces) * (len(self.t_0s) - 1) * self.n_inv_step


def plan_studies(fr: FaceRunner, setting: FaceSetting, attributes: list[str], args: argparse.Namespace
                 ) -> dict[str, EntanglementPlan | AblationPlan]:
    """The studies asked for, planned before any is run (their work is known up front)."""
    plans: dict[str, EntanglementPlan | AblationPlan] = {}
    if args.entanglement:
        study = dataclasses.replace(setting, name="entanglement", k=args.entanglement_k,
                                    space=args.entanglement_space or setting.space)
        cosines = pair_cosines(fr, attributes, study.t_0)
        plans["entanglement"] = EntanglementPlan(study, cosines, chosen_pairs(cosines, args.pairs, args.max_pairs),
                                                 np.arange(min(args.entanglement_n, len(fr.runner.images))))
    if args.ablations:
        plans["ablations"] = ablation_plan(fr, setting, attributes, args)
    return plans


def run_studies(fr: FaceRunner, sweeps: dict[str, Sweep], plans: dict, args: argparse.Namespace,
                progress: Progress) -> dict:
    """The planned studies: {"entanglement": ..., "ablations": ...} (only those planned)."""
    found = {}
    if "entanglement" in plans:
        found["entanglement"] = entanglement(fr, plans["entanglement"], args, progress)
    if "ablations" in plans:
        found["ablations"] = ablations(fr, sweeps, plans["ablations"], args, progress)
    return found


# --------------------------------------------------------------------------------- entanglement

def pair_cosines(fr: FaceRunner, attributes: list[str], t_0: int) -> list[dict]:
    """The cosine of the current normals of every pair of ``attributes`` in each space, from the
    engine's description of the two moved together; a pair too close to move together (the
    engine's refusal) is listed with the reason instead."""
    found = []
    for i, a in enumerate(attributes):
        for b in attributes[i + 1:]:
            request = EditRequest((Move(a, 0.0, 0.0), Move(b, 0.0, 0.0)), Denoising(2), k=1, space="both")
            try:
                spaces = fr.runner.describe(t_0, request).spaces
                found.append({"pair": [a, b], **{f"cos_{s}": float(e.cosines[0, 1]) for s, e in spaces.items()}})
            except UserError as exc:
                found.append({"pair": [a, b], "error": str(exc)})
    return found


def chosen_pairs(cosines: list[dict], wanted: list[str] | None, most: int) -> list[tuple[str, str]]:
    """The pairs of ``--pairs`` (names as the boundaries spell them), else those whose z cosine
    reaches ``HOLD_THRESHOLD``, largest |cos| first, at most ``most``."""
    if wanted:
        names = {n.lower(): n for c in cosines for n in c["pair"]}
        pairs = [tuple(part.strip() for part in text.split("/")) for text in wanted]
        unknown = [p for pair in pairs for p in pair if p.lower() not in names]
        if unknown:
            raise UserError(f"--pairs names {unknown[0]!r}, which has no boundaries here (evaluated: "
                            f"{', '.join(sorted(names.values()))})")
        return [(names[a.lower()], names[b.lower()]) for a, b in pairs]
    close = [c for c in cosines if "cos_z" in c and abs(c["cos_z"]) >= HOLD_THRESHOLD]
    close.sort(key=lambda c: -abs(c["cos_z"]))
    return [tuple(c["pair"]) for c in close[:most]]


def own_targets(fr: FaceRunner, setting: FaceSetting, attribute: str, rows: np.ndarray) -> np.ndarray:
    """Where each face of ``rows`` sits along ``attribute``'s normal in the setting's one space, in
    the setting's unit: the target that keeps it there (the engine's ``source_distances``; for the
    relative unit, the engine's own targets of the values 0 and 1 give its centre and scale)."""
    space, t_0 = setting.space, setting.t_0
    probe = fr.runner.probe(attribute, t_0, space=space)
    values = np.array([row[space] for row in probe.source_distances(fr.runner.inversion(t_0, rows.tolist()))])
    if setting.unit == "relative":
        centre = fr.runner.probe(attribute, t_0, space=space, unit="relative").distances(space)[0]
        one = fr.runner.describe(t_0, EditRequest((Move(attribute, 1.0, 1.0),), Denoising(2), k=1, space=space,
                                                  unit="relative")).distances(space)[0]
        values = (values - centre) / (one - centre)
    return values


def pair_edits(fr: FaceRunner, setting: FaceSetting, a: str, b: str, rows: np.ndarray, args: argparse.Namespace
               ) -> tuple[dict[str, np.ndarray], dict]:
    """A's edits of the faces ``rows``: {"single", "held"[, "joint"]: measured (n, K, F)}, and the
    held description's hold ratios, A's targets (v.n of the first space) and, with "joint", its
    largest pixel difference from "held"."""
    move = Move(a, setting.start, setting.end)
    described = {"single": fr.runner.describe(setting.t_0, edit_request(setting, [move], args.seed, args.batch_size)),
                 "held": fr.runner.describe(setting.t_0, edit_request(setting, [move], args.seed, args.batch_size,
                                                                      held=(b,), force=True))}
    images = {name: fr.runner.edits(setting.t_0, d, rows.tolist()) for name, d in described.items()}
    info = {"hold_ratio": {s: float(e.hold_ratios[0]) for s, e in described["held"].spaces.items()},
            "targets": described["single"].distances()}
    if setting.space != "both":
        parts = []
        for row, own in zip(rows, own_targets(fr, setting, b, rows)):
            request = edit_request(setting, [move, Move(b, float(own), float(own))], args.seed, args.batch_size)
            parts.append(fr.runner.edits(setting.t_0, fr.runner.describe(setting.t_0, request), [int(row)]))
        images["joint"] = torch.cat(parts) if parts else images["held"][:0]
        info["joint_minus_held_max_abs"] = float((images["joint"] - images["held"]).abs().max()) if parts \
            else float("nan")
    measured = {name: fr.instrument.measure(x.flatten(0, 1)).reshape(len(rows), setting.k, -1)
                for name, x in images.items()}
    return measured, info


def pair_measures(measured: dict[str, np.ndarray], a: str, b: str, score_sd: np.ndarray, targets: np.ndarray
                  ) -> dict:
    """The leak into B per unit of A of each variant (per face and pooled), A's gain, and the
    reduction of the leak by the hold (and by the joint move)."""
    ia, ib = ATTRIBUTES.index(canonical(a)), ATTRIBUTES.index(canonical(b))
    found, per_face = {}, {}
    for name, m in measured.items():
        scores = attribute_scores(m.reshape(-1, m.shape[-1]), PREDICTED_NAMES).reshape(len(m), -1, len(ATTRIBUTES))
        moved, other = scores[:, None, :, ia], scores[:, None, :, ib]
        per_face[name] = leak(moved, other, float(score_sd[ia]), float(score_sd[ib]))
        found[name] = {"leak": spread(per_face[name]),
                       "pooled_leak": pooled_leak(moved, other, float(score_sd[ia]), float(score_sd[ib])),
                       "gain": spread(target_gain(scores[..., ia], targets)),
                       "moved_score_range_in_sd": spread(np.ptp(scores[..., ia], axis=1) / score_sd[ia])}
    for name in [n for n in measured if n != "single"]:
        single = per_face["single"]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(single > 0, per_face[name] / np.where(single > 0, single, 1.0), np.nan)
        pooled = found[name]["pooled_leak"] / found["single"]["pooled_leak"]
        found[name]["reduction"] = {"pooled": float(1 - pooled), "per_face": spread(1 - ratio)}
    return found


def entanglement(fr: FaceRunner, plan: EntanglementPlan, args: argparse.Namespace, progress: Progress) -> dict:
    """``--entanglement``: each planned pair's single / held (/ joint) edits and their leak."""
    study, cosines, rows, variants = plan.study, plan.cosines, plan.rows, plan.variants
    results = []
    for a, b in plan.pairs:
        measured, info = pair_edits(fr, study, a, b, rows, args)
        found = pair_measures(measured, a, b, fr.instrument.scale.score_sd, np.asarray(info["targets"]))
        cos = next((c for c in cosines if set(c["pair"]) == {a, b}), {})
        results.append({"moved": a, "other": b, "cosines": {k: v for k, v in cos.items() if k.startswith("cos")},
                        **info, "variants": found})
        progress.step(variants * len(rows) * study.k * study.n_test_step,
                      f"entanglement {a} -> {b}: leak single {found['single']['pooled_leak']:.3f}, held "
                      f"{found['held']['pooled_leak']:.3f} (pooled), hold lowers it by "
                      f"{found['held']['reduction']['pooled']:.0%}")
    return {"setting": dataclasses.asdict(study), "n_faces": len(rows), "threshold": HOLD_THRESHOLD,
            "pair_cosines": cosines, "pairs": results,
            "joint": "measured" if study.space != "both" else "not expressible with both spaces moved (one target "
                                                               "per attribute for z and h): equal to held by "
                                                               "construction; run with --entanglement_space z"}


# --------------------------------------------------------------------------------- ablations

def ablation_names(setting: FaceSetting, attributes: list[str], args: argparse.Namespace,
                   fitted: dict[str, list[int]]) -> tuple[list[str], list[int]]:
    """The ablation attributes (``--ablation_attributes``, else ``ABLATION_ATTRIBUTES`` evaluated,
    else the first four evaluated) and t_0 values (the run's first, then ``--ablate_t0`` or every
    t_0 at which one of them has boundaries, ``fitted``: attribute -> its t_0 values)."""
    if args.ablation_attributes:
        by_name = {a.lower(): a for a in attributes}
        wanted = [n.strip() for n in args.ablation_attributes.split(",") if n.strip()]
        missing = [n for n in wanted if n.lower() not in by_name]
        if missing:
            raise UserError(f"--ablation_attributes names {missing[0]!r}, which is not evaluated in this run "
                            f"({', '.join(attributes)})")
        chosen = [by_name[n.lower()] for n in wanted]
    else:
        chosen = [a for a in attributes if canonical(a) in ABLATION_ATTRIBUTES] or attributes[:4]
    others = args.ablate_t0 if args.ablate_t0 is not None else sorted({t for a in chosen for t in fitted.get(a, [])})
    return chosen, list(dict.fromkeys([setting.t_0, *others]))


def ablation_plan(fr: FaceRunner, setting: FaceSetting, attributes: list[str], args: argparse.Namespace
                  ) -> AblationPlan:
    """Every ablation run: each attribute at each t_0 where it has boundaries in both spaces,
    moving both, z and h, on its first ``--ablation_per_side`` faces per side."""
    chosen, t_0s = ablation_names(setting, attributes, args, fr.runner.index.attributes())
    rows = {a: fr.chosen(a, args.ablation_per_side) for a in chosen}
    faces = np.unique(np.concatenate(list(rows.values()))).astype(np.int64)
    runs = []
    for t in t_0s:
        fitted = set(fr.runner.index.held_together([], t))
        for space in ("both", "z", "h"):
            runs += [(a, ablation_setting(fr, setting, a, t, space, args), (t, space) == (setting.t_0, setting.space))
                     for a in chosen if a in fitted]
    other_eta = 0.0 if setting.eta > 0 else 1.0   # the fresh noise of the edits against none
    runs += [(a, dataclasses.replace(setting, name=f"eta {other_eta:g}", eta=other_eta), False) for a in chosen]
    return AblationPlan(chosen, t_0s, rows, faces, runs, fr.runner.n_inv_step, setting.eta)


def ablation_setting(fr: FaceRunner, setting: FaceSetting, attribute: str, t_0: int, space: str,
                     args: argparse.Namespace) -> FaceSetting:
    """``setting`` at ``t_0`` moving ``space``; an absolute range shifted with the boundary's centre."""
    shift = 0.0
    if t_0 != setting.t_0 and setting.unit == "absolute" and not args.no_shift_t0:
        shift = t_0_shift(fr.runner, attribute, t_0, setting.t_0)
    return dataclasses.replace(setting, name=f"{space} at t_0 {t_0}", t_0=t_0, space=space,
                               start=round(setting.start + shift, 4), end=round(setting.end + shift, 4))


def ablation_sweep(sub: FaceRunner, pool_rows: np.ndarray, local_rows: np.ndarray, main: Sweep | None,
                   setting: FaceSetting, attribute: str, args: argparse.Namespace) -> Sweep:
    """The sweep of one ablation: taken from the run's own (``main``) where it edited these faces
    (``pool_rows``), else made on ``sub``, the ablation faces' runner (``local_rows`` index it)."""
    if main is not None and np.isin(pool_rows, main.rows).all():
        where = {int(r): i for i, r in enumerate(main.rows)}
        return main.subset(np.array([where[int(r)] for r in pool_rows], dtype=np.int64))
    return sub.sweep(setting, attribute, local_rows, args.batch_size)[0]


def directed(n_toward: int, n_away: int) -> float:
    """The one-sided sign test of edits that moved the score beyond the noise: the probability of
    at least ``n_toward`` of them toward the intended side if each went either way with probability
    1/2 (an edit that changes the score at random: the fresh noise of eta > 0). 1 when none moved."""
    n = n_toward + n_away
    return float(binomtest(n_toward, n, 0.5, alternative="greater").pvalue) if n else 1.0


def ablation_summary(results: list[dict], eta: float) -> dict:
    """Per (t_0, space, eta): the mean over attributes of each share, and the sign test over all
    their edits; per t_0 whether h-only edits (at the run's ``eta``) move the attributes (toward
    the intended side beyond the noise more often than away, p < ``SIGN_TEST_P``); the t_0 whose
    edits with both spaces succeed with the nuisance kept most often (ties: most successes, then
    most moved beyond the noise)."""
    table: dict[tuple[int, str, float], list[dict]] = {}
    for r in results:
        table.setdefault((r["t_0"], r["space"], r["eta"]), []).append(r)
    keys = ("success", "moved_beyond_noise", "moved_away_beyond_noise", "kept", "success_and_kept")
    means = [{"t_0": t, "space": s, "eta": e, "attributes": len(rs),
              **{k: float(np.nanmean([r[k] for r in rs])) for k in keys},
              "sign_test_p": directed(sum(r["n_toward"] for r in rs), sum(r["n_away"] for r in rs))}
             for (t, s, e), rs in sorted(table.items())]
    by = {(m["t_0"], m["space"], m["eta"]): m for m in means}
    h_only = [{**{k: m[k] for k in ("t_0", "moved_beyond_noise", "moved_away_beyond_noise", "success", "sign_test_p")},
               "moves_attributes": bool(m["sign_test_p"] < SIGN_TEST_P),
               "z_only_moved_beyond_noise": by.get((m["t_0"], "z", eta), {}).get("moved_beyond_noise")}
              for m in means if m["space"] == "h" and m["eta"] == eta]
    both = [m for m in means if m["space"] == "both" and m["eta"] == eta and np.isfinite(m["success_and_kept"])]
    best = max(both, key=lambda m: (m["success_and_kept"], m["success"], m["moved_beyond_noise"]))["t_0"] \
        if both else None
    return {"means": means, "h_only": h_only, "best_t_0": best}


def radius_result(path: Path | None, checkpoint_sha256: str) -> dict | None:
    """t_m of a ``main.py --radius`` result, and whether it was measured on this checkpoint."""
    if path is None:
        return None
    found = read_json(path, "radius result")
    if not isinstance(found, dict) or "t_m" not in found:
        raise UserError(f"{path} is not a radius.json of main.py --radius (no t_m)")
    return {"path": str(path), "t_m": found["t_m"], "epsilon": found.get("epsilon"),
            "same_checkpoint": found.get("checkpoint_sha256") == checkpoint_sha256}


def ablations(fr: FaceRunner, sweeps: dict[str, Sweep], plan: AblationPlan, args: argparse.Namespace,
              progress: Progress) -> dict:
    """``--ablations``: every planned run, measured; the run's own setting taken from its sweeps."""
    sub = FaceRunner(fr.runner.subset(plan.faces.tolist()), fr.instrument, fr.seed)
    results = []
    for a, study, own in plan.runs:
        local = np.searchsorted(plan.faces, plan.rows[a])
        sweep = ablation_sweep(sub, plan.rows[a], local, sweeps.get(a) if own else None, study, a, args)
        m = sweep_measures(sweep, fr.instrument.scale)
        results.append({"attribute": a, "t_0": study.t_0, "space": study.space, "eta": study.eta, "start": study.start,
                        "end": study.end,
                        "n": m["both"]["n"], "to_positive": m["to_positive"]["success"],
                        "to_negative": m["to_negative"]["success"],
                        **{k: m["both"][k] for k in ("success", "moved_beyond_noise", "moved_away_beyond_noise",
                                                     "n_toward", "n_away", "kept", "success_and_kept")},
                        "score_change_toward_in_sd": m["both"]["score_change_toward_in_sd"]["median"]})
        progress.step(0 if own else len(local) * study.k * study.n_test_step,
                      f"ablation {a}, {study.space} at t_0 {study.t_0}, eta {study.eta:g}: success "
                      f"{m['both']['success']:.0%}, moved beyond noise {m['both']['moved_beyond_noise']:.0%}, "
                      f"nuisance kept {m['both']['kept']:.0%}")
    return {"attributes": plan.attributes, "t_0": plan.t_0s, "per_side": args.ablation_per_side, "results": results,
            **ablation_summary(results, plan.eta),
            "radius": radius_result(args.radius_json, fr.runner.engine.model.checkpoint_sha256)}
