"""The evaluations of ``python -m scripts.evaluate_edits``, one module per data set.

- ``common``: what every data set shares: the engine-based runner (``EngineRunner``: inversion,
  reference reconstructions, fidelity regenerations and edits, all through ``runners.engine``),
  the one-attribute sweep settings and their ablations, pixel helpers and the report's writing;
- ``digits``: the digits measures (ink mass, a logistic-regression classifier, class flips,
  sample quality) and the command line of the digits evaluation;
- ``digits_joint``: the multi-attribute evaluation of the digits (``--joint``: thick and slant
  moved and held, with the digit's class free and held);
- ``faces``: the synthetic faces (configs/faces.yml), measured by the factor predictor
  (``utils.faces.predictor``): model quality, success, leak and nuisance kept per attribute, with
  ``faces_runs`` (the faces, the instrument, settings and the runner), ``faces_measures`` (the
  measures, arrays only), ``faces_studies`` (entanglement and ablations) and ``faces_report``
  (tables, the edit picture, the hardware).

``scripts/evaluate_edits.py`` picks the module by the config's ``data.dataset`` (its
``EVALUATIONS``); a data set's module provides ``main(argv) -> int``.
"""
