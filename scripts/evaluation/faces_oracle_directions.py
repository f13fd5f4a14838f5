"""The best a single direction can do: the renderer's perfect edits inverted to t_0 and averaged
(docs/faces_report.md section 7).

    .venv/bin/python -m scripts.evaluation.faces_oracle_directions --out runs/oracle_dirs \\
        --json docs/faces_oracle_directions.json --table docs/faces_oracle_directions.md
    .venv/bin/python -m scripts.evaluate_edits --config faces.yml --boundary_dir runs/oracle_dirs \\
        --attributes <the same> --n_test 100 --per_side 8 --k 3 --start -10 --end 10

``--n_faces`` rendered training faces (from ``--offset`` in factors.csv, away from the faces the
search fits on) and, per attribute, the same faces toggled by the renderer to the attribute's other
class with nothing else changed (``utils.faces.factors.toggled``, as ``faces_oracle``), both inverted
to t_0 as the command line inverts (40 steps, eta 0). Face i's perfect edit is then the move
m_i = z(toggled_i) - z(face_i), signed toward the positive class, and likewise in h. A boundary
edits every face along one direction; the best single one, in the least-squares sense, is the mean
move's, written to ``--out`` as a boundary file (the shipped file's header, that unit normal,
intercept 0, no accuracies or class summary) so that the faces evaluation can edit with it.

``move_consistency`` says how much one direction can hold: the share of the moves' energy on their
mean, |mean m|^2 / mean |m_i|^2 (1 when every face moves alike; about 1/N when the moves are
unrelated). Beside it each move's length, the mean move's length, the moves' components along the
mean direction (what an edit of that size reproduces), and the cosine of the mean direction with
the shipped boundary's normal.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runners.engine import (Engine, EngineOptions, UserError, latent_cache_root, load_boundary, load_config,
                            save_boundary)
from scripts.evaluation.common import (add_output_flags, command_line, load_evaluated_model, run_reporting_errors,
                                       write_report)
from scripts.evaluation.faces_oracle import rendered
from utils.faces.factors import ATTRIBUTES, attribute_scores, factor_matrix, factors_from_row, toggled

#: Attributes measured by default: two of each kind (a small part, colour, a large part, age).
DEFAULT_ATTRIBUTES = "Smiling,Eyeglasses,Black_Hair,Blond_Hair,Pale_Skin,Gray_Hair,Bangs,Young"


def move_consistency(moves: np.ndarray) -> dict[str, float]:
    """Moves (N, D) -> {"consistency": |mean|^2 / mean |m_i|^2, "mean_norm": |mean|, "move_norm":
    mean |m_i|, "along_mean", "along_mean_sd": mean and sd of m_i . u with u the mean's unit
    direction}."""
    moves = np.asarray(moves, dtype=np.float64).reshape(len(moves), -1)
    mean = moves.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    along = moves @ (mean / norm) if norm > 0 else np.zeros(len(moves))
    return {"consistency": norm ** 2 / float(np.mean((moves ** 2).sum(axis=1))), "mean_norm": norm,
            "move_norm": float(np.mean(np.linalg.norm(moves, axis=1))), "along_mean": float(along.mean()),
            "along_mean_sd": float(along.std())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="faces.yml")
    parser.add_argument("--boundary_dir", type=Path, default=Path("boundary"), help="the boundaries whose headers "
                        "the directions take (at --t_0)")
    parser.add_argument("--out", type=Path, required=True, help="folder the mean directions are written to")
    parser.add_argument("--data_dir", type=Path, default=Path("data/faces"))
    parser.add_argument("--attributes", default=DEFAULT_ATTRIBUTES)
    parser.add_argument("--n_faces", type=int, default=100)
    parser.add_argument("--offset", type=int, default=5000, help="first training face used (factors.csv order)")
    parser.add_argument("--t_0", type=int, default=None, help="default: the config's")
    add_output_flags(parser, batch_size=16)
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv) -> int:
    start = time.perf_counter()
    config = load_config(args.config)
    t_0 = args.t_0 or config.edit.t_0
    attributes = [a for a in args.attributes.split(",") if a]
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise UserError(f"unknown attribute {unknown[0]!r}; the faces have {', '.join(ATTRIBUTES)}")
    with open(args.data_dir / "factors.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"][args.offset:args.offset + args.n_faces]
    if len(rows) < 2:
        raise UserError(f"{args.data_dir / 'factors.csv'} has fewer than 2 training faces from --offset {args.offset}")
    faces = [factors_from_row(r) for r in rows]
    scores = attribute_scores(factor_matrix(faces))
    engine = Engine(load_evaluated_model(config, None, args.precision, args.threads),
                    EngineOptions(cache_root=latent_cache_root(None), show_progress=False))
    index = engine.boundary_index(args.boundary_dir)
    headers = {a: index.find(a, t_0)[2] for a in attributes}  # every header found before any inversion
    report = {"attributes": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with engine.session(t_0, config.edit.n_inv_step) as editor:
        base, _ = editor.invert(rendered(faces), args.batch_size)
        for attribute in attributes:
            a = ATTRIBUTES.index(attribute)
            negative = scores[:, a] <= 0  # these are toggled to positive, the rest to negative
            other, _ = editor.invert(rendered([toggled(f, attribute, bool(n)) for f, n in zip(faces, negative)]),
                                     args.batch_size)
            sign = torch.from_numpy(np.where(negative, 1.0, -1.0))
            entry = {}
            for space in ("z", "h"):
                moves = ((getattr(other, space) - getattr(base, space)).flatten(1).double() * sign[:, None]).numpy()
                mean = moves.mean(axis=0)
                direction = mean / np.linalg.norm(mean)
                record = load_boundary(headers[attribute][space])
                normal = direction.astype(np.float32).reshape(record.normal.shape)
                save_boundary(args.out / Path(headers[attribute][space]).name, record.with_direction(normal))
                shipped = record.normal.astype(np.float64).reshape(-1)
                entry[space] = {**move_consistency(moves),
                                "cos_shipped": float(direction @ shipped / np.linalg.norm(shipped))}
            report["attributes"][attribute] = entry
    report.update(command=command_line("scripts.evaluation.faces_oracle_directions", argv),
                  seconds=time.perf_counter() - start, t_0=t_0, n_faces=len(faces), offset=args.offset,
                  out=str(args.out))
    write_report(report, table(report), args.json, args.table)
    return 0


def table(report: dict) -> str:
    lines = ["| attribute | consistency z (h) | perfect move, mean length z | mean move's length z | "
             "moves along the mean z: mean ± sd | cos with the shipped normal z (h) |", "|---|---|---|---|---|---|"]
    for attribute, e in report["attributes"].items():
        z, h = e["z"], e["h"]
        lines.append(f"| {attribute} | {z['consistency']:.3f} ({h['consistency']:.3f}) | {z['move_norm']:.1f} | "
                     f"{z['mean_norm']:.2f} | {z['along_mean']:.2f} ± {z['along_mean_sd']:.2f} | "
                     f"{z['cos_shipped']:+.2f} ({h['cos_shipped']:+.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
