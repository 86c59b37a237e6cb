"""Load a function's module the way the Lambda runtime does: by file, registered in sys.modules
(pydantic and dataclasses look a module up there to resolve its annotations)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_function(name: str) -> ModuleType:
    """functions/<name>/app.py, freshly imported (module-level settings read the environment now)."""
    module_name = f"function_{name}_app"
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "functions" / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
