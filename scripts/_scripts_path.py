"""Imported first by every script in this folder: keeps the folder last on `sys.path`.

Python puts a script's own folder first on `sys.path`, where `scripts/evaluate.py` would shadow
the `evaluate` package that `refseg.metrics` imports. The folder stays importable (for
`train_args` and `train`), just after the installed packages.
"""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]
