"""Every benchmark imports: one whose import broke (a helper of a sibling renamed or gone)
fails here, in every test run, rather than on the day someone measures with it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(path.stem for path in BENCH.glob("*.py"))


def test_there_are_benchmarks_to_import() -> None:
    assert {"cluster", "pipeline", "tiny_stack"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_the_benchmark_imports(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As `python bench/<name>.py` runs it: bench/ first on the path, siblings by plain name.
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        module = importlib.import_module(name)
        assert Path(str(module.__file__)).parent == BENCH, f"{name!r} is another module"
    finally:
        # The benchmarks' plain names (`pipeline`, `loss`) must not shadow anything later.
        for loaded, held in list(sys.modules.items()):
            if Path(str(getattr(held, "__file__", None))).parent == BENCH:
                del sys.modules[loaded]
