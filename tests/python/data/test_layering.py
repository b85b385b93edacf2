"""Layering: the data layer (``crcm.data``) builds nothing on the training layer above it."""

from __future__ import annotations

import subprocess
import sys


def test_data_does_not_import_training() -> None:
    # A fresh interpreter: this process has imported crcm.training through other tests.
    code = (
        "import sys\n"
        "import crcm.data, crcm.data.atari, crcm.data.dataset, crcm.data.batch\n"
        "from crcm.data.batch import Batch\n"
        "bad = sorted(m for m in sys.modules if m == 'crcm.training' or "
        "m.startswith('crcm.training.'))\n"
        "assert not bad, bad\n"
        "import crcm.training.data\n"
        "assert crcm.training.data.Batch is Batch  # the old import path still works\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_data_module_imports_training_even_lazily() -> None:
    """Imports inside functions count too: ``AtariClips.batch`` once imported ``Batch`` from
    ``crcm.training.data`` at call time, which the import check above cannot see."""
    import ast
    from pathlib import Path

    import crcm.data

    offenders = []
    for path in sorted(Path(crcm.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}:{node.lineno} {n}"
                for n in names
                if n == "crcm.training" or n.startswith("crcm.training.")
            ]
    assert not offenders, offenders
