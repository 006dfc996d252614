"""report.show: one stored pair as a PNG, checked against the pixels read back independently."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attacks import figures, fool
from attacks.methods.noise import noise_images
from benchmarks.attack_models import load_split
from common import schema, storage
from common.errors import ConfigError
from report import show

pytestmark = pytest.mark.slow

SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def results(attacked) -> str:
    """The shared attack run (every method, four targets, two noise starts, images kept)."""
    return attacked[0].output


def stored(results: str, method: str, target: int, image_id: str) -> np.ndarray:
    """The pair's stored pixels, read with pyarrow alone."""
    table = pq.read_table(f"{results}/pairs/method={method}/target={target}",
                          filters=[(schema.IMAGE_ID, "=", image_id)])
    (image,) = table.column(schema.IMAGE).to_pylist()
    return np.frombuffer(image, np.uint8).reshape(SHAPE)


def panel(png: bytes, i: int) -> np.ndarray:
    """Panel i of a picture, sampled back to one value per image pixel."""
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    left, top, right, bottom = figures.panel_box(i, SHAPE)
    return picture[top:bottom:figures.SCALE, left:right:figures.SCALE]


def a_val_pair(results: str, ingested: str) -> tuple[str, np.ndarray]:
    """A validation image that the sign step had to move to target 1, and its pixels."""
    rows = pq.read_table(f"{results}/pairs/method=sign/target=1").to_pylist()
    image_id = next(r[schema.IMAGE_ID] for r in rows
                    if r[schema.ORIGIN] == "val" and r[schema.PRED] != 1 and r[schema.SUCCESS])
    X, _, ids = load_split(ingested, "val")
    return image_id, X[ids.index(image_id)].reshape(SHAPE)


def test_the_panels_are_the_original_and_the_stored_pixels(results, ingested, tmp_path):
    image_id, original = a_val_pair(results, ingested)
    out = tmp_path / "pair.png"
    png = show.run(show.Settings(results=results, image_id=image_id, target="1",
                                 output=str(out), method="sign"))
    assert out.read_bytes() == png
    fooling = stored(results, "sign", 1, image_id)
    assert (panel(png, 0) == original).all()
    assert (panel(png, 2) == fooling).all()
    change, delta = panel(png, 1).astype(int), fooling.astype(int) - original
    assert (change[delta > 0] > 128).all() and (change[delta < 0] < 127).all()
    assert (np.abs(change[delta == 0] - 127.5) <= 0.5).all()  # no change: mid-grey
    assert {0, 255} & set(np.unique(change))  # the largest change reaches black or white


def test_the_default_method_is_exact_and_noise_starts_are_drawn_again(results, tmp_path):
    png = show.run(show.Settings(results=results, image_id="noise-00000", target="2",
                                 output=str(tmp_path / "noise.png")))
    seed = storage.read_manifest(results)[schema.M_IDENTITY]["settings"]["seed"]
    assert (panel(png, 0) == noise_images(1, seed, SHAPE)[0].reshape(SHAPE)).all()
    assert (panel(png, 2) == stored(results, "exact", 2, "noise-00000")).all()


def test_from_s3_results_the_same_picture(results, ingested, bucket, tmp_path):
    fs, root = storage.filesystem(f"{bucket}/show-results")
    pafs.copy_files(results, root, destination_filesystem=fs)
    image_id, _ = a_val_pair(results, ingested)
    args = {"image_id": image_id, "target": "2", "method": "sign"}
    local = show.run(show.Settings(results=results, output=str(tmp_path / "a.png"), **args))
    show.run(show.Settings(results=f"{bucket}/show-results", output=f"{bucket}/show/a.png",
                           **args))
    assert storage.read_bytes(f"{bucket}/show/a.png") == local


@pytest.mark.parametrize("image_id, target, method, message", [
    ("ILSVRC2012_val_99999999", "1", "sign", "holds no pair of image 'ILSVRC2012_val_99999999'"),
    ("noise-00000", "9", "sign", "holds no pairs with target 9"),
    ("noise-00000", "1", "fgsm", "holds no 'fgsm' pairs"),
    ("noise-00000", "tench", "sign", "unknown target 'tench'"),
])
def test_a_pair_that_is_not_there_is_one_line(results, tmp_path, capsys, image_id, target,
                                              method, message):
    argv = ["--results", results, "--image-id", image_id, "--target", target, "--method", method,
            "--output", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit) as e:
        show.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_results_without_images_are_refused(ingested, results, tmp_path):
    model = storage.read_manifest(results)[schema.M_SOURCE]["model"]
    out = str(tmp_path / "none")
    fool.run(fool.Settings(data=ingested, model=model, output=out, methods=("sign",),
                           targets=("1",), limit_images=1, keep_images="none", num_workers=1))
    with pytest.raises(ConfigError, match="--keep-images none"):
        show.run(show.Settings(results=out, image_id="noise-00000", target="1",
                               output=str(tmp_path / "x.png")))


def test_a_picture_inside_the_results_is_refused_and_the_results_untouched(tmp_path):
    from report import show
    results = tmp_path / "fooling"
    results.mkdir()
    (results / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="is inside the results"):
        show.run(show.Settings(results=str(results), image_id="x", target="0",
                               output=str(results / "manifest.json")))
    assert (results / "manifest.json").read_text() == "{}"
