"""Commands exit 0 after success, every time (benchmarks/exit_loop.py runs the long loop).

The abort this guards against: pyarrow reading Parquet from a Python file object (io.BytesIO)
lets its I/O threads touch that object; one doing so while the interpreter exits is ended by
CPython in the middle of C++ and the process aborts ("terminate called without an active
exception", exit status 134) in a few percent of runs, after all its output was printed.
tests/test_fool.py runs ``attacks.summary`` on a real attack output in a short loop.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
READERS = {"read_table", "ParquetFile", "read_parquet", "dataset", "read_metadata",
           "read_schema", "open_file", "open_stream"}


def python_files_given_to_pyarrow(source: str) -> list[int]:
    """Lines where a Parquet/Arrow reader is called with an io.BytesIO(...) argument."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in READERS:
            for arg in node.args:
                if (isinstance(arg, ast.Call) and getattr(arg.func, "attr", None) == "BytesIO"):
                    lines.append(node.lineno)
    return lines


def test_no_module_reads_arrow_data_from_a_python_file_object():
    assert python_files_given_to_pyarrow("import io\npq.read_table(io.BytesIO(raw))\n") == [2]
    packages = [d for d in ROOT.iterdir() if (d / "__init__.py").exists()]
    assert {"attacks", "pipelines", "training", "tests"} <= {d.name for d in packages}
    found = {str(p.relative_to(ROOT)): python_files_given_to_pyarrow(p.read_text())
             for d in packages for p in d.rglob("*.py")}
    assert {p: n for p, n in found.items() if n} == {}
