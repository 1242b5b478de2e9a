"""``import resq_brevitas`` is lazy, every public name still resolves, and Brevitas's
fast_hadamard_transform warning is silenced for Brevitas's module only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "brevitas", "onnx", "onnxruntime", "qonnx", "resq_brevitas.deploy",
         "resq_brevitas.observers", "brevitas.export")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=True)


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules loaded after running ``code`` in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    return json.loads(_python(probe).stdout.splitlines()[-1])


def test_import_loads_no_heavy_module() -> None:
    assert _loaded_after("import resq_brevitas") == []


def test_the_core_api_loads_no_export_or_observer_machinery() -> None:
    loaded = _loaded_after("import resq_brevitas as resq\n"
                           "resq.convert, resq.calibrate, resq.ResQModel, resq.count_bops")
    assert "brevitas" in loaded  # the core does need Brevitas: the probe sees real imports
    assert not {"onnx", "onnxruntime", "qonnx", "resq_brevitas.deploy",
                "resq_brevitas.observers", "brevitas.export"} & set(loaded)


def test_every_public_name_resolves_and_functions_stay_functions() -> None:
    import resq_brevitas as resq
    import resq_brevitas.calibrate  # noqa: F401  (binds the submodule name on the package)
    import resq_brevitas.convert  # noqa: F401

    for name in resq.__all__:
        assert getattr(resq, name) is not None, name
    assert callable(resq.convert) and resq.convert.__module__ == "resq_brevitas.convert"
    assert callable(resq.calibrate) and resq.calibrate.__module__ == "resq_brevitas.calibrate"
    assert resq.nn.ResQConv2d.__name__ == "ResQConv2d"
    assert resq.deploy.OnnxStream.__name__ == "OnnxStream"
    assert set(resq.__all__) <= set(dir(resq))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        resq.nope  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("fast_hadamard_transform") is not None,
                    reason="the optional kernel package is installed: Brevitas does not warn")
def test_fast_hadamard_warning_is_silenced_only_for_brevitas() -> None:
    equalize = "import brevitas.graph.equalize"
    bare = _python(f"import warnings; warnings.simplefilter('default'); {equalize}")
    assert "fast_hadamard_transform" in bare.stderr  # what users saw before
    quiet = _python(f"import resq_brevitas, warnings; {equalize}; "
                    "warnings.warn('fast_hadamard_transform package not found (elsewhere)')")
    assert quiet.stderr.count("fast_hadamard_transform") == 1
    assert "(elsewhere)" in quiet.stderr
