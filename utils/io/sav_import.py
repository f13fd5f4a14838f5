"""Read the original code's ``.sav`` boundaries (pickled scikit-learn ``SVC``) without running
untrusted code: a restricted unpickler admits only the classes such a file needs and refuses
every other global, so a crafted file cannot call ``os.system`` or anything else on load.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path

import numpy as np

from utils.errors import UserError

# (module, name) pairs a pickled linear SVC consists of, across numpy 1.x / 2.x module paths.
_ALLOWED = {
    ("sklearn.svm._classes", "SVC"),
    ("sklearn.svm.classes", "SVC"),  # scikit-learn < 0.22
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("_codecs", "encode"),  # how protocols < 3 store bytes; turns a str into bytes, nothing else
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Python 2 names (copy_reg, __builtin__) that protocols < 3 write, mapped as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UserError(f"refusing to load '{module}.{name}': a .sav boundary holds only a scikit-learn SVC "
                            "and numpy arrays")
        return super().find_class(module, name)


def read_sav(path: str | Path) -> tuple[np.ndarray, float]:
    """(coef (D,) float64, intercept) of the linear SVC pickled in ``path``; UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"boundary file {path} does not exist")
    data = path.read_bytes()
    try:
        svm = _RestrictedUnpickler(io.BytesIO(data)).load()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed stream: the unpickler's errors are of many types
        raise UserError(f"{path} is not a readable pickled SVC ({type(exc).__name__})") from None
    coef = getattr(svm, "coef_", None) if getattr(svm, "kernel", None) == "linear" else None
    if coef is None:
        raise UserError(f"{path} does not hold a fitted linear SVC")
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    if not np.isfinite(coef).all() or not np.linalg.norm(coef) > 0:
        raise UserError(f"{path} holds a degenerate SVC (zero or non-finite coefficients)")
    return coef, float(np.asarray(svm.intercept_).reshape(-1)[0])
