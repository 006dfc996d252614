"""The report's confident gallery (report/confident.py): fooling images the model is at least P
sure of, from an attack of the same model run with --confidence P."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from attacks import fool
from common import schema
from common.errors import ConfigError
from common.model import read_model
from report import confident
from tests.attacked import settings

pytestmark = pytest.mark.slow
P = 0.99


@pytest.fixture(scope="module")
def pushed(ingested, model_dir, tmp_path_factory) -> str:
    """The shared model attacked with --confidence 0.99 (sign, the first 4 images)."""
    out = str(tmp_path_factory.mktemp("confident"))
    fool.run(settings(ingested, model_dir, out, methods=("sign",), confidence=P, limit_images=4,
                      noise_images=0))
    return out


def panels(html: str, shape) -> list[np.ndarray]:
    """The gallery's images, in order, as (D,) uint8 pixels."""
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
        out.append(np.asarray(img.resize(shape[1::-1], Image.Resampling.NEAREST)).ravel())
    return out


def test_every_image_shown_is_at_least_p_sure_of_its_target(pushed, attacked, model_dir):
    _, main = attacked
    title, html = confident.gallery(pushed, main, [f"c{k}" for k in range(4)], 6)
    assert "99%" in title and "--confidence 0.99" in html
    shape = tuple(main[schema.M_IMAGE_SHAPE])
    fooled = panels(html, shape)[2::3]  # original | change | fooling image
    assert 1 <= len(fooled) <= 4  # one a target, at most the four classes
    model = read_model(model_dir)
    for x in fooled:
        s = x @ model.W.T.astype(np.float64) + model.b
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        assert p.max() >= P - 1e-6, p  # the stored image, scored here with numpy


def test_an_attack_without_confidence_or_of_another_model_is_refused(attacked, attacked_sweep):
    cfg, main = attacked
    with pytest.raises(ConfigError, match="was run without --confidence"):
        confident.gallery(cfg.output, main, ["c"] * 4, 6)
    other = attacked_sweep["manifest"]["rows"][0]["attack"]
    with pytest.raises(ConfigError, match="attacked another model"):
        confident.gallery(other, main, ["c"] * 4, 6)
