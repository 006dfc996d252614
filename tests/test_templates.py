"""templates.png: each class's weights as a picture, stretched to 0..255, in a titled grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common import templates

SHAPE = (8, 8, 3)


def test_each_template_is_stretched_on_its_own():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 8 * 8 * 3)) * np.array([[1e-4], [1.0], [1e3]])
    images = templates.to_images(W, SHAPE)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    for k in range(3):
        assert images[k].min() == 0 and images[k].max() == 255
        # the order of the weights is kept: the largest weight is the brightest pixel
        assert np.unravel_index(W[k].argmax(), SHAPE) in zip(*np.nonzero(images[k] == 255))


def test_rows_are_read_as_hwc_pixels():
    W = np.zeros((1, 8 * 8 * 3))
    W[0, 2::3] = 1.0  # every blue weight
    image = templates.to_images(W, SHAPE)[0]
    assert (image[..., 2] == 255).all() and (image[..., :2] == 0).all()


def test_a_constant_template_does_not_divide_by_zero():
    assert (templates.to_images(np.full((1, 8 * 8 * 3), 4.0), SHAPE) == 0).all()


def test_mosaic_places_every_class():
    images = np.stack([np.full(SHAPE, 10 * (k + 1), np.uint8) for k in range(5)])
    out = templates.mosaic(images, cols=3, pad=2, label=4)
    assert out.shape == (2 * (8 + 4), 3 * (8 + 2), 3)
    for k in range(5):
        r, c = divmod(k, 3)
        assert (out[r * 12: r * 12 + 8, c * 10: c * 10 + 8] == 10 * (k + 1)).all()
    assert (out[12:20, 20:28] == 255).all()  # the sixth cell stays empty


def test_render_writes_a_png_grid():
    rng = np.random.default_rng(1)
    names = ["tench, Tinca tinca", "goldfish", "a very long class name indeed, really"]
    png = templates.render(rng.normal(size=(3, 8 * 8 * 3)), SHAPE, names, title="reg=1")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_short_names():
    assert templates.short_name("tench, Tinca tinca") == "tench"
    assert len(templates.short_name("x" * 100)) == templates.MAX_TITLE


def test_render_needs_one_name_per_class():
    with pytest.raises(ValueError, match="names"):
        templates.render(np.zeros((2, 8 * 8 * 3)), SHAPE, ["only one"])
