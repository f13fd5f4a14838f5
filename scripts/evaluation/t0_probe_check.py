"""Check of the t_0 report's edit probe against the factor predictor (a trial; see docs/faces_report.md section 9).

    ATTR=Wearing_Hat TS=200,400,600,800 .venv/bin/python -m scripts.evaluation.t0_probe_check
"""
import os, sys
from pathlib import Path
import numpy as np, torch
import importlib; R = importlib.import_module("runners.engine.t0_report")
from models.loading import load_model
from utils.faces.predictor import load_predictor

attr = os.environ.get("ATTR", "Wearing_Hat")
factor = {"Wearing_Hat": "hat", "Bangs": "bangs", "Smiling": "smile", "Young": "age"}[attr]
thr = {"hat": 0.5, "bangs": 0.5, "smile": 0.25, "age": 0.425}[factor]
sign = -1 if factor == "age" else 1
store = {}
orig = R._probe_edits
def spy(editor, fit, spaces, targets, probe, denoising, control):
    out = orig(editor, fit, spaces, targets, probe, denoising, control)
    store[(fit.t, control)] = out
    return out
R._probe_edits = spy
model = load_model("faces.yml")
lab = R.labelled_for_report(attr, Path("data/faces/images/train"), Path("data/faces/list_attr_faces.txt"), 200, 100, 0)
probe = R.EditProbe.for_config(model.config, 8, 0)
ts = [int(t) for t in os.environ.get("TS", "200,400,600,800").split(",")]
rows = R.t0_rows(model, ts, 40, labelled=lab, n_linearity=1, probe=probe,
                 cache_root=Path.home() / ".cache/boundarydiffusion/latents")
chosen = R.probe_rows(lab, 16)
targets = 1 - lab.labels[lab.test[chosen]]
pred = load_predictor()
for r in rows:
    t = r["t"]
    e = r["editability"]
    for control in (False, True):
        p = pred.predict(store[(t, control)].clamp(-1, 1))[factor].numpy()
        read = (sign * (p - thr) > 0).astype(int)
        hit = read == targets
        print(t, "control" if control else "normal ", "predictor flip %.2f (to+ %.2f, to- %.2f)" % (hit.mean(), hit[targets == 1].mean(), hit[targets == 0].mean()),
              "| probe flip %.2f control %.2f" % (e["flip"], e["control"]))
from runners.engine.editor import ImageReader
reader = ImageReader.for_config(model.config, align_face=False)
others = np.setdiff1d(np.arange(len(lab.test)), chosen)
X = torch.stack([reader.read(lab.paths[i]) for i in lab.test[others]]).reshape(len(others), -1).double().numpy()
y = lab.labels[lab.test[others]]
mp, mn = X[y == 1].mean(0), X[y == 0].mean(0)
w, mid = mp - mn, (mp + mn) / 2
Xp = torch.stack([reader.read(lab.paths[i]) for i in lab.test[chosen]]).reshape(len(chosen), -1).double().numpy()
print("pixel readout on unedited probe images: acc %.2f" % (((Xp - mid) @ w > 0).astype(int) == 1 - targets).mean())
for r in rows:
    t = r["t"]
    res = []
    for control in (False, True):
        E = store[(t, control)].clamp(-1, 1).reshape(len(chosen), -1).double().numpy()
        read = ((E - mid) @ w > 0).astype(int)
        res.append((read == targets).mean())
    print(t, "pixel mean-difference readout: flip %.2f control %.2f sel %.2f" % (res[0], res[1], res[0] - res[1]))
