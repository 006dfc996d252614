"""docs/analysis.md's Python API section runs as written, against an oracle computed with numpy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from benchmarks.attack_models import fit_softmax, load_split, write_model

ANALYSIS = Path(__file__).resolve().parent.parent / "docs" / "analysis.md"


def test_readme_python_api_runs_and_agrees_with_numpy(ingested, tmp_path, monkeypatch, capsys):
    from common import storage

    X, y, _ = load_split(ingested, "train")
    classes = storage.read_manifest(ingested)["classes"]
    W, b = fit_softmax(X, y, len(classes), 1e-3, steps=60)
    model_dir = write_model(str(tmp_path / "model"), W, b, classes)
    section = ANALYSIS.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    scope: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(block.replace("out/model", model_dir).replace("out/imagenet64", ingested), scope)  # noqa: S102
    Xv = scope["X"].numpy().astype(np.float64)
    S = Xv @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(scope["S"].numpy(), S, rtol=1e-4, atol=1e-2)
    stored = scope["fooled"].images.numpy()[0].astype(np.float64)
    fooled_scores = stored @ W.T.astype(np.float64) + b
    assert fooled_scores.argmax() == 3  # the sign attack reaches its target on this model
    assert scope["result"]["linf"].item() == np.abs(stored - Xv[0]).max()
    assert capsys.readouterr().out.startswith(f"{classes[3]}: eps ")
