"""The analysts' report (report/build.py) from a small real attack run; opened in Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attacks import fool
from benchmarks.attack_models import fit_softmax, load_split, write_model
from common import schema, storage
from common.errors import ConfigError
from common.model import write_weights
from common.sweep import SweepRow, write_sweep
from report import build as report

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dirs(ingested, attacked, tmp_path_factory):
    """A two-setting sweep in training.sweep's layout, and the shared attack run."""
    root = tmp_path_factory.mktemp("report")
    sweep = root / "sweep"
    X, y, _ = load_split(ingested, "train")
    classes = storage.read_manifest(ingested)[schema.M_CLASSES]
    rows = []
    for reg in (1e-4, 1.0):
        W, b = fit_softmax(X, y, len(classes), reg, steps=60)
        model = write_model(str(sweep / f"reg={reg:g}"), W, b, classes)
        rows.append(SweepRow(reg=reg, robust_eps=0.0,
                             val_top1=float(np.mean((X @ W.T + b).argmax(1) == y)), val_top5=1.0,
                             val_loss=1.0, train_loss=1.0, train_top1=1.0, w_norm=1.0,
                             w_pixels_norm=float(np.linalg.norm(W)), epochs=1,
                             median_sign_eps=10.0 * (1 + reg), model=model))
    write_sweep(str(sweep), rows)
    storage.write_manifest(str(sweep), {schema.M_KIND: "sweep"})
    cfg, _ = attacked
    return {"model": cfg.model, "sweep": str(sweep), "results": cfg.output, "root": root}


@pytest.fixture(scope="module")
def built(run_dirs):
    out = str(run_dirs["root"] / "report")
    manifest = report.run(report.Settings(results=run_dirs["results"], output=out,
                                          sweep=run_dirs["sweep"]))
    return out, manifest


def test_every_figure_exists_and_is_a_valid_image(built):
    out, manifest = built
    figures = [f["path"] for f in manifest[schema.M_FILES] if f["path"].endswith(".png")]
    names = {os.path.basename(f) for f in figures}
    assert {"templates.png", "budget.png", "strength.png", "targets.png", "sources.png",
            "tradeoff.png"} <= names
    assert any(n.startswith("templates_reg=") for n in names)
    assert any("noise" in n for n in names) and any("val" in n for n in names)  # contact sheets
    for rel in figures:
        img = Image.open(os.path.join(out, rel))
        img.verify()
        assert img.size[0] > 100 and img.size[1] > 100


def test_page_is_self_contained(built):
    out, manifest = built
    page = open(os.path.join(out, "index.html")).read()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    assert manifest[schema.M_TIMINGS]["total_s"] > 0
    for heading in ("templates", "budget", "trade-off", "Source classes"):
        assert heading in page


def test_the_page_tells_the_story_with_class_names(built, run_dirs):
    out, _ = built
    page = open(os.path.join(out, "index.html")).read()
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.split("<details>")[0])))
    assert "The data is the built-in sample, not ImageNet" in text  # the sample's mark is seen
    # the headline's median is the methods table's, over the same pairs (those that had to move)
    half = re.search(r"becomes any class you choose with a change of ([\d.]+) levels out of 255 "
                     r".*? ([\d,]+) \(validation image, target\) pairs that had to move", text)
    assert half, text[:2000]
    exact = re.search(r"<tr><td[^>]*>exact</td><td[^>]*>validation</td>(.*?)</tr>",
                      section(page, "methods")).group(1)
    _, fooled, median, *_ = re.findall(r">([^<]*)</td>", exact)
    assert float(fooled.rstrip("%")) < 100 or median == half.group(1)  # all fooled: the same
    for method in ("template", "sign", "exact"):  # the default methods, each in a sentence
        assert re.search(rf"\b{method}\b (adds|repeats|solves)", text)
    assert "certified bound" in text
    assert '"keep_images"' in html.unescape(page.split("<details>")[1])  # the run, collapsed
    names = storage.read_manifest(run_dirs["results"])[schema.M_CLASS_NAMES]
    targets = section(page, "targets")
    assert all(n.split(",")[0] in targets for n in names)  # classes by name, not index
    for key in ("targets", "sources"):  # the easiest and hardest lists share no class
        easiest, hardest = (set(re.findall(r'<tr><td class="l">([^<]+)</td>', part))
                            for part in section(page, key).split("<b>hardest</b>"))
        assert easiest and hardest and not easiest & hardest, (easiest, hardest)
    assert not re.search(r"\d\.\d+e[+-]\d", text)  # numbers for people: 3,000 not 3e+03


def test_the_l2_chart_and_sentence_when_exact_l2_ran(tmp_path):
    """On a small attack output with exact-l2 (tests/test_summary.py): the L2 section draws its
    chart, and the lead's sentence gives the first budget that holds exact-l2's median pair (at
    most 5% above it); an output without exact-l2, or written before budget_l2, has neither."""
    from attacks import summary
    from report import sections, story
    from tests.test_summary import moved_l2, with_exact_l2

    out = str(tmp_path / "attack")
    m = with_exact_l2(out)
    frames = {k: t.to_pandas() for k, t in summary.read_summary(out).items()}
    f = sections.Facts(out, m, frames, None, schema.class_names(m))
    [part] = sections.budget_l2(f)
    assert set(f.files) == {"budget_l2.png"} and Image.open(io.BytesIO(f.files["budget_l2.png"]))
    assert "certified bound" in html.unescape(part.body)
    text = story.headline_l2(frames["budget_l2"], pairs=10)
    said = re.search(r"needs at most <b>([\d.,]+) levels</b> \(exact-l2, the true minimal L2 "
                     r"change\)", text)
    values = np.sort(moved_l2(out, "exact-l2"))
    assert said and np.median(values) <= float(said.group(1).replace(",", ""))
    assert float(said.group(1).replace(",", "")) <= 1.05 * values[len(values) // 2]
    for frames_, methods in (({k: v for k, v in frames.items() if k != "budget_l2"},
                              m[schema.M_COUNTS]["methods"]), (frames, ["sign"])):
        g = sections.Facts(out, {**m, schema.M_COUNTS: {**m[schema.M_COUNTS],
                                                        "methods": methods}}, frames_, None, [])
        assert sections.budget_l2(g) == []


def section(page: str, key: str) -> str:
    return page.split(f'<section id="{key}">', 1)[1].split("</section>", 1)[0]


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_gallery_images_are_the_stored_pairs(built, run_dirs):
    """Each pair of the smallest-changes gallery (the headline method's: exact, among the
    default methods), against the stored row read with pyarrow."""
    out, _ = built
    part = section(open(os.path.join(out, "index.html")).read(), "smallest")
    assert "Exact, the true minimum: the pairs fooled with the least" in part
    m = storage.read_manifest(run_dirs["results"])
    short = [n.split(",")[0] for n in m[schema.M_CLASS_NAMES]]
    pairs = re.findall(r'class="pair">(.*?)<div class="note">([^<]+) → ([^<]+)</div>', part)
    assert pairs
    for block, image_id, name in pairs:
        original, change, fooling = (pixels(u) for u in re.findall(r'src="([^"]+)"', block))
        table = pq.read_table(os.path.join(run_dirs["results"], "pairs", "method=exact",
                                           f"target={short.index(html.unescape(name))}"),
                              filters=[(schema.IMAGE_ID, "=", html.unescape(image_id))])
        (row,) = table.to_pylist()
        assert (fooling.reshape(-1) == np.frombuffer(row[schema.IMAGE], np.uint8)).all()
        assert np.abs(fooling.astype(int) - original).max() == row[schema.LINF]


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page, quiet, with a profile of its own; stderr holds its log."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         *args], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


WIDTHS = (1280, 390)  # a laptop's screen and a phone's, in CSS pixels

# The page in an iframe per width (a headless window is at least 500 px wide, an iframe any
# width), then what the page's own document measured there: how wide it scrolls, how wide it
# is, and how many charts show their phone drawing (a <picture>'s source, not its <img>'s src).
PROBE = """<!doctype html><body>{frames}<pre id="probe"></pre><script>
addEventListener("load", () => {{
  const seen = [...document.querySelectorAll("iframe")].map(f => {{
    const d = f.contentDocument;
    return {{width: f.clientWidth, scroll: d.documentElement.scrollWidth,
             client: d.documentElement.clientWidth, phone: [...d.querySelectorAll("picture img")]
               .filter(i => i.currentSrc !== i.src).length}};
  }});
  document.getElementById("probe").textContent = JSON.stringify(seen);
}});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_page_opens_in_headless_chromium(built, tmp_path):
    """Drawn at a laptop's and a phone's width, without errors; at either the page's document
    does not scroll sideways (wide tables and grids scroll in their own boxes), and on the
    phone the charts are their narrow drawings."""
    out, _ = built
    for width in WIDTHS:
        shot = tmp_path / f"shot-{width}.png"
        proc = chromium(tmp_path, f"--window-size={width},3000", f"--screenshot={shot}",
                        f"file://{os.path.join(out, 'index.html')}")
        page_errors = [line for line in proc.stderr.splitlines()
                       if "CONSOLE" in line or "Failed to load resource" in line]
        assert not page_errors, page_errors
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
        assert pixels.shape[1] == width
        assert pixels.std() > 10  # not blank: text, tables and figures drawn
        assert (pixels < 128).mean() > 0.01
    shutil.copy(os.path.join(out, "index.html"), tmp_path / "index.html")
    frames = "".join(f'<iframe src="index.html" style="width:{w}px;height:2000px;border:0">'
                     "</iframe>" for w in WIDTHS)
    (tmp_path / "probe.html").write_text(PROBE.format(frames=frames))
    proc = chromium(tmp_path, "--allow-file-access-from-files", "--window-size=1700,2200",
                    "--dump-dom", f"file://{tmp_path / 'probe.html'}")
    seen = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout,
                                              re.S).group(1)))
    assert [s["width"] for s in seen] == list(WIDTHS)
    for s in seen:
        assert s["scroll"] <= s["client"], f"at {s['width']} px the page scrolls sideways: {s}"
    laptop, phone = seen
    assert laptop["phone"] == 0 and phone["phone"] >= 3  # budget, strength, targets, sources


def test_report_to_s3_matches_local(built, run_dirs, bucket):
    out = f"{bucket}/report-test"
    report.run(report.Settings(results=run_dirs["results"], output=out, overwrite=True))
    page = storage.read_bytes(f"{out}/index.html").decode()
    assert "budget" in page and storage.exists(f"{out}/{schema.FIGURES_DIR}/budget.png")
    png = storage.read_bytes(f"{out}/{schema.FIGURES_DIR}/budget.png")
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_results_without_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "results" / "pairs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no manifest.json: it is not a complete attack output"):
        report.run(report.Settings(results=str(tmp_path / "results"),
                                   output=str(tmp_path / "out")))


def readme_blocks(section: str, lang: str) -> list[str]:
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "analysis.md")).read()
    part = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", part, re.S)


def test_readme_analyst_queries_run_as_written(run_dirs, tmp_path, monkeypatch):
    """docs/analysis.md's pandas, pyarrow and DuckDB snippets, on a real output (paths swapped)."""
    results = run_dirs["results"]
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks("Analysing the results", "python")
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(block.replace("out/fooling", results), scope)  # noqa: S102 - the docs' own code
    per_target, hardest = scope["per_target"], scope["hardest"]
    pairs = pq.read_table(os.path.join(results, schema.SUMMARY_DIR, schema.SUMMARY_TARGETS))
    truth = {r["target"]: r["success_rate"] for r in pairs.to_pylist()
             if r["method"] == "sign" and r["origin"] == "val"}
    assert {int(k): v for k, v in per_target.items()} == pytest.approx(truth)
    assert (hardest.linf >= hardest.bound_linf).all()
    assert Image.open(tmp_path / "fooling.png").size == (256, 256)
    duckdb = pytest.importorskip("duckdb")
    (sql,) = readme_blocks("Analysing the results", "sql")
    rows = duckdb.sql(sql.replace("out/fooling", results)).fetchall()
    assert {(m, t) for m, t, *_ in rows} == {(r["method"], r["target"]) for r in pairs.to_pylist()
                                             if r["origin"] == "val"}


def test_another_model_than_the_attacks_is_refused(run_dirs, tmp_path):
    """--model must be the model the attack used: its weights' sha256 is checked."""
    other = os.path.join(run_dirs["sweep"], "reg=1")
    with pytest.raises(ConfigError, match=r"reg=1 is not the model the attack .* used"):
        report.run(report.Settings(results=run_dirs["results"], output=str(tmp_path / "r"),
                                   model=other))
    assert not os.path.exists(tmp_path / "r")


def _copy(run_dirs, tmp_path) -> tuple[str, str]:
    results, model = str(tmp_path / "fooling"), str(tmp_path / "model")
    shutil.copytree(run_dirs["results"], results)
    shutil.copytree(run_dirs["model"], model)
    return results, model


def test_a_missing_summary_table_is_one_line(run_dirs, tmp_path):
    results, _ = _copy(run_dirs, tmp_path)
    os.remove(os.path.join(results, schema.SUMMARY_DIR, schema.SUMMARY_BUDGET))
    with pytest.raises(ConfigError, match=r"budget.parquet is missing: the attack output is "
                                          "incomplete"):
        report.run(report.Settings(results=results, output=str(tmp_path / "r")))


@pytest.mark.parametrize("arrays, message", [
    (lambda W, b: {"W": W[:, :-1].reshape(-1), "b": b}, "do not match"),
    (lambda W, b: {"W": W, "b": b[:-1]}, "do not match"),
    (lambda W, b: {"W": np.array([{"evil": 1}], dtype=object), "b": b}, "without pickled"),
])
def test_a_bad_weights_file_is_one_line(run_dirs, tmp_path, arrays, message):
    results, model = _copy(run_dirs, tmp_path)
    path = os.path.join(model, schema.WEIGHTS_FILE)
    with np.load(path) as z:
        W, b, classes = z["W"], z["b"], z["classes"]
    np.savez(path, **arrays(W, b), classes=classes)
    with pytest.raises(ConfigError, match=message) as e:
        report.run(report.Settings(results=results, output=str(tmp_path / "r"), model=model))
    assert "\n" not in str(e.value)


def test_rerun_refuses_and_overwrite_replaces_the_report(run_dirs, tmp_path):
    out = str(tmp_path / "r")
    report.run(report.Settings(results=run_dirs["results"], output=out))
    with pytest.raises(ConfigError, match="already holds a finished report output"):
        report.run(report.Settings(results=run_dirs["results"], output=out))
    (tmp_path / "r" / "figures" / "budget.png").write_bytes(b"stale")
    report.run(report.Settings(results=run_dirs["results"], output=out, overwrite=True))
    assert Image.open(tmp_path / "r" / "figures" / "budget.png").format == "PNG"


@pytest.fixture(scope="module")
def thousand(ray_local, tmp_path_factory) -> str:
    """An attack on a random 1,000-class model: four validation images of noise, two targets."""
    root = tmp_path_factory.mktemp("thousand")
    C, D, n = 1000, 64 * 64 * 3, 4
    rng = np.random.default_rng(0)
    classes = [f"n{k:08d}" for k in range(C)]
    labels = [0, 250, 500, 750]
    images = pa.table({
        schema.IMAGE_ID: [f"ILSVRC2012_val_{i + 1:08d}" for i in range(n)],
        schema.LABEL: labels, schema.WNID: [classes[k] for k in labels],
        schema.IMAGE: [rng.integers(0, 256, D, dtype=np.uint8).tobytes() for _ in range(n)],
        schema.SOURCE: [f"{i}.JPEG" for i in range(n)], schema.ORIG_WIDTH: [64] * n,
        schema.ORIG_HEIGHT: [64] * n}, schema=schema.IMAGES_SCHEMA)
    (root / "data" / "val").mkdir(parents=True)
    pq.write_table(images, root / "data" / "val" / "part-00000.parquet")
    data, model = str(root / "data"), str(root / "model")
    storage.write_manifest(data, {
        schema.M_KIND: "ingest", schema.M_CLASSES: classes, schema.M_IMAGE_SHAPE: [64, 64, 3],
        schema.M_CLASS_NAMES: [f"class {k}, the {k}th of a thousand" for k in range(C)],
        schema.M_COUNTS: {"val": {"written": n}},
        schema.M_FILES: [{"path": "val/part-00000.parquet", "rows": n}]})
    write_weights(model, rng.normal(0, 1e-3, (C, D)).astype(np.float32), np.zeros(C), classes)
    storage.write_manifest(model, {schema.M_KIND: "train", schema.M_CLASSES: classes})
    results = str(root / "fooling")
    fool.run(fool.Settings(data=data, model=model, output=results, methods=("sign",),
                           targets=("1", "999"), num_workers=1))
    return results


def test_the_page_stays_light_at_1000_classes(thousand, tmp_path):
    """The templates of 1,000 classes are linked, not inlined: the page stays within budget."""
    out = tmp_path / "report"
    report.run(report.Settings(results=thousand, output=str(out)))
    size = (out / "index.html").stat().st_size
    assert size < report.BUDGET_MB * 2**20, f"index.html is {size / 2**20:.1f} MiB"
    page = (out / "index.html").read_text()
    assert 'href="figures/templates.png"' in page and "48 of the 1,000 classes" in page
    full = Image.open(out / "figures" / "templates.png")
    assert full.width * full.height > 1000 * 64 * 64  # every class, at full size
    assert "class 999" in section(page, "targets")
