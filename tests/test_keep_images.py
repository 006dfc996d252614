"""--keep-images sample, the attack's default (attacks/fool.py, worker.py, pairs.py): every pair
keeps its measurements, only the pairs of the first --sample-images validation images and of the
noise starts keep their fooling image, and every reader draws from those."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from attacks import transfer
from attacks.pairs import Pairs, kept_ids, open_attack
from attacks.tables import read_transfer
from common import dataset, schema
from common.errors import ConfigError
from common.model import read_model
from report import examples, show
from tests.attacked import settings

pytestmark = pytest.mark.slow
SAMPLE, NOISE = 5, 2


@pytest.fixture(scope="module")
def sampled(ingested, model_dir, tmp_path_factory) -> tuple[str, dict]:
    from attacks import fool

    out = str(tmp_path_factory.mktemp("sampled"))
    cfg = settings(ingested, model_dir, out, methods=("sign",), noise_images=NOISE,
                   keep_images="sample", sample_images=SAMPLE)
    assert fool.Settings(data="d", model="m", output="o").keep_images == "sample"  # the default
    return out, fool.run(cfg)


def first_val_ids(data: str, n: int) -> list[str]:
    """The first n validation ids in the data's order, read here with pyarrow."""
    m = dataset.open_ingest(data)
    ids = [i for f in dataset.split_files(data, m, "val")
           for i in pq.read_table(f, columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist()]
    return ids[:n]


def test_only_the_sample_keeps_its_images_and_every_pair_its_measurements(sampled, ingested,
                                                                           model_dir):
    out, m = sampled
    pairs = Pairs.open(out)
    targets = m[schema.M_IDENTITY]["settings"]["targets"]
    sample = set(first_val_ids(ingested, SAMPLE))
    noise = {f"noise-{k:05d}" for k in range(NOISE)}
    model = read_model(model_dir)
    rows = 0
    for t in targets:
        table = pairs.read("sign", t, [schema.IMAGE_ID, schema.ORIGIN, schema.IMAGE,
                                       schema.FOOLED_PRED, schema.LINF])
        rows += table.num_rows
        for image_id, image, fooled, linf in zip(*(table[c].to_pylist() for c in (
                schema.IMAGE_ID, schema.IMAGE, schema.FOOLED_PRED, schema.LINF))):
            assert linf is not None  # measured, kept or not
            assert (image is not None) == (image_id in sample | noise), image_id
            if image is not None:  # the stored image is what the row says it is
                x = np.frombuffer(image, np.uint8).astype(np.float64)
                assert int((x @ model.W.T.astype(np.float64) + model.b).argmax()) == fooled
    assert rows == (m[schema.M_COUNTS]["val_images"] + NOISE) * len(targets)
    assert kept_ids(open_attack(out)) == sample | noise


def test_the_readers_draw_from_the_sample(sampled, ingested, model_dir, tmp_path):
    out, m = sampled
    kept = kept_ids(m)
    targets = m[schema.M_IDENTITY]["settings"]["targets"]
    picks = examples.extremes(Pairs.open(out), "sign", targets, 10, kept=kept)
    chosen = picks["smallest"] + picks["confident"]
    assert picks["smallest"] and all(i in kept for i, _, _ in chosen)
    # transfer scores the pairs that hold an image, no others
    transfer.run(transfer.Settings(results=out, models=(model_dir,),
                                   output=str(tmp_path / "transfer")))
    scored = read_transfer(str(tmp_path / "transfer"))
    assert sum(r.pairs for r in scored) == len(kept) * len(targets)
    # report.show: a pair outside the sample is one line
    outside = sorted(set(first_val_ids(ingested, 99)) - kept)[0]
    with pytest.raises(ConfigError, match="holds no fooling image of"):
        show.run(show.Settings(results=out, image_id=outside, target="0",
                               output=str(tmp_path / "x.png"), method="sign"))
