"""The import layering (docs/design.md, "Layers"), read from the source: every import, including
those inside functions, runs one way, and no module imports itself through others."""

from __future__ import annotations

import ast
import functools
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("common", "pipelines", "attacks", "training", "report", "infra", "benchmarks", "tests")
# What each layer may import of the project, besides itself. The most specific layer applies.
ALLOWED = {
    "common": (),
    "pipelines": ("common",),
    "attacks.methods": ("common.schema", "common.heap"),  # the math: no Ray, storage or job code
    "attacks": ("common", "attacks.methods"),
    "training": ("common", "attacks.methods"),  # the sweep measures each model's strength
    "report": ("common", "attacks"),
    "infra": ("common", "pipelines"),
    "benchmarks": ("common", "pipelines", "attacks", "training", "report", "infra"),
    "tests": PACKAGES,
}
# Third-party modules the attack math must not reach: it runs inside any job, on any device.
NOT_IN_METHODS = ("ray", "pyarrow", "boto3", "botocore", "matplotlib", "PIL")
# The job modules, the only ones that may import Ray (and the shared flags and progress helpers).
RAY_MODULES = {"pipelines.ingest", "pipelines.sink", "training.train", "training.worker",
               "training.sweep", "attacks.fool", "common.cli", "common.progress"}


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(p for p in parts if p != "__init__")] = path
    return out


def imports(path: pathlib.Path, name: str) -> set[str]:
    """Every module ``name`` imports, as dotted names (``from a import b`` gives a.b when b is a
    module of the project, else a)."""
    known = modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return out


def layer(name: str) -> str:
    return max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i for i in imports(p, m) if i in known and i != m} for m, p in known.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in g.items()
                  for d in deps if not within(d, (layer(m), *ALLOWED[layer(m)])))


def test_every_import_runs_down_the_layers():
    bad = violations(graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_checker_catches_a_wrong_import():
    """The layering test can fail: a common module that imports a job package is caught."""
    g = {**graph(), "common.probe": {"attacks.fool"}}
    assert violations(g) == ["common.probe -> attacks.fool"]


def test_ray_only_in_the_jobs():
    """The core (decode, softmax, attack math, tables, pictures) runs and is tested without Ray."""
    importers = {m for m, p in modules().items() if not within(m, ("tests", "benchmarks", "infra"))
                 and any(within(i, ("ray",)) for i in imports(p, m))}
    assert importers <= RAY_MODULES, sorted(importers - RAY_MODULES)


def test_the_attack_math_imports_no_engine_or_storage():
    known = modules()
    bad = [f"{m} -> {i}" for m, p in known.items() if within(m, ("attacks.methods",))
           for i in imports(p, m) if within(i, NOT_IN_METHODS)]
    assert not bad, bad


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_report_show_starts_without_the_heavy_libraries():
    """report.show answers one pair in about a second (docs/benchmarks.md, the rehearsal): it
    draws with Pillow and reads with pyarrow.parquet, so matplotlib, pandas (which
    pyarrow.dataset imports), torch and Ray stay unloaded until a module really needs them."""
    code = ("import sys, report.show; print(','.join(m for m in ('matplotlib', 'pandas', "
            "'torch', 'ray', 'pyarrow.dataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "", f"report.show imports {out} on start"
