"""The faces evaluation's report (``scripts/evaluation/faces.py``): the markdown tables of its
numbers, the picture of edits along each attribute, and the machine the numbers came from."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from utils.io.plots import labelled_grid

#: Cells of the edit picture are at least this many pixels (32-px faces enlarged 3 x, nearest neighbour).
GRID_CELL = 96


def hardware(threads: int) -> dict:
    """The CPU model and count, PyTorch's threads and version, Python and the platform."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "threads": threads, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def edit_grid(path: Path, shown: dict, setting, results: dict, names: list[str]) -> None:
    """One row per shown face and attribute (original, reconstruction, the K edits), labelled with
    the attribute, the face, the way it is edited and whether that succeeded; ``names``: the file
    names of the evaluated faces; cells of ``GRID_CELL`` px."""
    rows, labels = [], []
    for attribute, (pool_rows, sides, cells) in shown.items():
        faces = results[attribute]["faces"]
        for row, side, cell in zip(pool_rows.tolist(), sides.tolist(), cells):
            success = faces["success"][faces["rows"].index(row)]
            way = "- to +" if side < 0 else "+ to -"
            labels.append(f"{attribute}, {Path(names[row]).stem}, {way}: {'ok' if success else 'failed'}")
            rows.append(cell)
    if not rows:
        return
    cells = torch.stack(rows)
    distances = next(iter(results.values()))["distances"]
    unit = "u" if setting.unit == "relative" else "d"
    labelled_grid(cells.flatten(0, 1).clamp(-1, 1), path, ncol=cells.shape[1], min_tile=GRID_CELL, row_labels=labels,
                  column_labels=["original", "reconstruction", *(f"{unit}={d:+g}" for d in distances)])


def _pct(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.0f} %"


def _num(value, fmt: str = ".3f") -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:{fmt}}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def instrument_lines(info: dict, noise_multiple: float) -> list[str]:
    """The predictor's error on rendered test faces, for the nuisance factors and the scores."""
    lines = [f"Instrument: factor predictor {info['path']} (sha256 {info['sha256'][:12]}...), error measured on "
             f"{info['n_test_faces']} rendered test faces.", ""]
    nuisance = ("bg_r", "bg_g", "bg_b", "pos_x", "pos_y", "scale", "skin_tone")
    lines += _table(["factor", "RMSE", "kept if abs(change) below"],
                    [[f, _num(info["factor_rmse"][f]), _num(noise_multiple * info["factor_rmse"][f])]
                     for f in nuisance])
    return lines + [""]


def success_lines(edits: dict) -> list[str]:
    """Per attribute and direction: success (n), its parts, nuisance kept, and the largest leaks."""
    rows = []
    for attribute, r in edits.items():
        up, down = r["to_positive"], r["to_negative"]
        leaks = {f: max(_finite(up["leak"][f]["pooled"]), _finite(down["leak"][f]["pooled"])) for f in up["leak"]}
        top = sorted((f for f in leaks if np.isfinite(leaks[f])), key=lambda f: -leaks[f])[:3]
        rows.append([attribute, f"{_pct(up['success'])} ({up['n']})", f"{_pct(down['success'])} ({down['n']})",
                     f"{_pct(up['already_across'])} / {_pct(down['already_across'])}",
                     f"{_pct(r['both']['moved_beyond_noise'])} / {_pct(r['both']['moved_away_beyond_noise'])}",
                     _pct(r["both"]["kept"]), _pct(r["both"]["success_and_kept"]),
                     _pct(r["both"].get("background_kept")), _pct(r["both"].get("success_and_background_kept")),
                     ", ".join(f"{f} {leaks[f]:.2f}" for f in top)])
    head = ["attribute", "success to + (n)", "success to − (n)", "reconstruction already across (+ / −)",
            "moved beyond noise: toward / away", "nuisance kept", "success with nuisance kept",
            "background kept (pixels)", "success with background kept", "largest leaks (per unit of score)"]
    return _table(head, rows) + [""]


def _finite(value) -> float:
    return value if value is not None and np.isfinite(value) else -np.inf


def quality_lines(q: dict) -> list[str]:
    """Attribute frequencies of samples against test faces, the Fréchet distances, the PSNR."""
    f, r = q["frechet"], q["reconstruction"]
    lines = [f"Samples from noise ({f['n_samples']}, DDIM {q['sampling_steps']} steps, eta {q.get('sampling_eta', 0):g}): Fréchet distance on the "
             f"predictor's features {f['samples_vs_test']:.2f} to the {f['n_test']} test faces; {f['n_train']} train "
             f"faces are at {f['train_vs_test']:.2f} (the floor). Reconstruction (inversion + regeneration, eta 0, "
             f"t_0 {r['t_0']}, {r['n_faces']} faces): PSNR {r['psnr']:.2f} dB (per face: median "
             f"{_num(r['psnr_per_face']['median'], '.2f')}, IQR {_num(r['psnr_per_face']['q25'], '.2f')}.."
             f"{_num(r['psnr_per_face']['q75'], '.2f')})."
             f" Attribute frequencies differ by {q['mean_abs_frequency_difference_points']:.1f} points on average:", ""]
    lines += _table(["attribute", "samples", "test faces", "difference (points)"],
                    [[a, _pct(v["samples"]), _pct(v["test"]), f"{v['difference_points']:+.1f}"]
                     for a, v in q["frequencies"].items()])
    return lines + [""]


def entanglement_lines(e: dict) -> list[str]:
    """Per pair: the cosines, the hold ratio, the leak into B single / held / joint, the reduction."""
    def med(d: dict) -> str:
        return f"{_num(d['median'])} [{_num(d['q25'])}, {_num(d['q75'])}]"

    rows = []
    for p in e["pairs"]:
        v = p["variants"]
        joint = v.get("joint")
        rows.append([f"{p['moved']} → {p['other']}", " / ".join(f"{_num(c, '+.2f')}" for c in p["cosines"].values()),
                     " / ".join(f"{_num(r, '.2f')}" for r in p["hold_ratio"].values()),
                     f"{med(v['single']['leak'])}; {_num(v['single']['pooled_leak'])}",
                     f"{med(v['held']['leak'])}; {_num(v['held']['pooled_leak'])}",
                     f"{med(joint['leak'])}; {_num(joint['pooled_leak'])}" if joint else "–",
                     f"{_pct(v['held']['reduction']['pooled'])} (per face "
                     f"{_pct(v['held']['reduction']['per_face']['median'])})",
                     f"{_num(v['single']['gain']['mean'], '.2f')} / {_num(v['held']['gain']['mean'], '.2f')}"])
    head = ["edited → other", "cos z / h", "hold ratio z / h", "leak single: median [IQR]; pooled", "leak held",
            "leak joint", "hold lowers the leak by (pooled; per-face median)", "gain of the edited single / held"]
    s = e["setting"]
    return [f"Entanglement: {e['n_faces']} faces, {s['k']} targets {s['start']:g}..{s['end']:g} ({s['unit']}), space "
            f"{s['space']}; pairs with |cos z| >= {e['threshold']:g}. Joint: {e['joint']}.", ""] + \
        _table(head, rows) + [""]


def ablation_lines(a: dict) -> list[str]:
    """Per t_0 and space: means over the ablation attributes; h only; the best t_0 and t_m."""
    rows = [[str(m["t_0"]), m["space"], f"{m['eta']:g}", str(m["attributes"]), _pct(m["success"]),
             f"{_pct(m['moved_beyond_noise'])} / {_pct(m['moved_away_beyond_noise'])} (p {m['sign_test_p']:.2g})",
             _pct(m["kept"]), _pct(m["success_and_kept"])] for m in a["means"]]
    lines = [f"Ablations on {', '.join(a['attributes'])} ({a['per_side']} faces per side; means over attributes):", ""]
    lines += _table(["t_0", "space", "eta", "attributes", "success", "moved beyond noise: toward / away (sign test)",
                     "nuisance kept", "success with nuisance kept"], rows) + [""]
    for h in a["h_only"]:
        verdict = "moves the attributes" if h["moves_attributes"] else "is not shown to move the attributes"
        lines.append(f"- h only at t_0 {h['t_0']}: {verdict}: {_pct(h['moved_beyond_noise'])} of edits moved the "
                     f"score toward the other side "
                     f"beyond the predictor's noise, {_pct(h['moved_away_beyond_noise'])} away from it (sign test "
                     f"p = {h['sign_test_p']:.2g}); {_pct(h['success'])} crossed (z only: "
                     f"{_pct(h['z_only_moved_beyond_noise'])} moved beyond the noise)")
    radius = a.get("radius")
    lines.append(f"- best t_0 (both spaces, success with nuisance kept): {a['best_t_0']}"
                 + (f"; mixing step t_m of {radius['path']}: {radius['t_m']}"
                    + ("" if radius["same_checkpoint"] else " (measured on another checkpoint)") if radius else ""))
    return lines + [""]


def markdown(report: dict) -> str:
    """Every table of the report, in the order of the measures."""
    s = report["setting"]
    lines = [f"# Faces evaluation ({report['config']}, {report['checkpoint']})", "",
             f"t_0 {s['t_0']}, {report['n_inv_step']} inversion / {s['n_test_step']} denoising steps, {s['k']} targets "
             f"{s['start']:g}..{s['end']:g} ({s['unit']}), space {s['space']}, eta {s['eta']:g}, h {s['h_policy']}, "
             f"seed {report['seed']}; {report['per_side']} faces per side of each attribute from the first "
             f"{len(report['test_faces'])} test faces.", ""]
    lines += instrument_lines(report["instrument"], report["noise_multiple"])
    if "quality" in report:
        lines += quality_lines(report["quality"])
    lines += success_lines(report["edits"])
    if "entanglement" in report:
        lines += entanglement_lines(report["entanglement"])
    if "ablations" in report:
        lines += ablation_lines(report["ablations"])
    h = report.get("hardware", {})
    lines.append(f"{h.get('cpu', '?')}, {h.get('threads', '?')} threads, torch {h.get('torch', '?')}; "
                 f"{report.get('seconds', 0) / 60:.1f} min. Command: `{report.get('command', '')}`")
    return "\n".join(lines) + "\n"
