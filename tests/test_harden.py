"""The hardening rounds (training/harden.py, training/rounds.py) on a tiny ingest of 4x4 images
written here (no Ray): the background class, where the fooling images come from, and every
measurement against a numpy recomputation from the stored weights and images."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attacks import frontier, tables
from common import schema, storage
from common.errors import ConfigError
from common.model import read_model
from common.sweep import read_harden
from training import harden, rounds

CLASSES = ["n00000001", "n00000002", "n00000003"]
SIDE = 4  # 4x4x3 images: D = 48
PER_CLASS = {"train": 24, "val": 8}


def write_ingest(out: str) -> dict:
    """Three classes of noisy colour patterns, as the ingest job writes them (one file a split)."""
    rng = np.random.default_rng(0)
    D, C = SIDE * SIDE * 3, len(CLASSES)
    means = rng.uniform(40, 215, (C, D))
    files, counts, pixels = [], {}, []
    for split, n in PER_CLASS.items():
        y = np.repeat(np.arange(C), n)
        X = np.clip(means[y] + rng.normal(0, 40, (len(y), D)), 0, 255).astype(np.uint8)
        pixels += [X] if split == "train" else []
        table = pa.Table.from_pydict({
            schema.IMAGE_ID: [f"{split}_{i:03d}" for i in range(len(y))],
            schema.LABEL: y.astype(np.int16), schema.WNID: [CLASSES[k] for k in y],
            schema.IMAGE: [x.tobytes() for x in X], schema.SOURCE: ["s"] * len(y),
            schema.ORIG_WIDTH: [SIDE] * len(y), schema.ORIG_HEIGHT: [SIDE] * len(y)},
            schema=schema.IMAGES_SCHEMA)
        os.makedirs(os.path.join(out, split))
        pq.write_table(table, os.path.join(out, split, "part-0.parquet"), write_page_checksum=True)
        files.append({"path": f"{split}/part-0.parquet", "rows": len(y)})
        counts[split] = {"seen": len(y), "written": len(y), "quarantined": 0}
    channels = pixels[0].reshape(-1, 3).astype(np.float64)
    manifest = {schema.M_KIND: "ingest", schema.M_CLASSES: CLASSES,
                schema.M_CLASS_NAMES: ["red", "green", "blue"],
                schema.M_IMAGE_SHAPE: [SIDE, SIDE, 3], schema.M_COUNTS: counts,
                schema.M_PIXEL_MEAN: channels.mean(0).tolist(),
                schema.M_PIXEL_STD: channels.std(0).tolist(), schema.M_FILES: files}
    storage.write_manifest(out, manifest)
    return manifest


def split(data: str, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    t = pq.read_table(os.path.join(data, name, "part-0.parquet"))
    X = np.stack([np.frombuffer(b, np.uint8) for b in t.column(schema.IMAGE).to_pylist()])
    return t.column(schema.IMAGE_ID).to_pylist(), X, t.column(schema.LABEL).to_numpy()


def scores(model: str, X: np.ndarray) -> np.ndarray:
    """numpy, float64: the oracle's scores of a stored model."""
    m = read_model(model)
    return X.astype(np.float64) @ m.W.T.astype(np.float64) + m.b


ROUNDS = 2


@pytest.fixture(scope="module")
def hardened(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("harden")
    data = str(root / "data")
    write_ingest(data)
    cfg = harden.Settings(data=data, output=str(root / "out"), rounds=ROUNDS, images_per_round=12,
                          limit_images=6, epochs=20, batch_size=16, lr=0.05, threads=1)
    return {"data": data, "cfg": cfg, "manifest": harden.run(cfg)}


def fooling(cfg: harden.Settings, mode: str, r: int, fresh: bool = False) -> dict:
    t = pq.read_table(storage.join(cfg.output, harden.fooling_path(mode, r, fresh)))
    out = {c: t.column(c).to_numpy() for c in (schema.LABEL, schema.TARGET, schema.LINF,
                                                 schema.ATTACKED_ROUND)}
    out[schema.IMAGE_ID] = t.column(schema.IMAGE_ID).to_pylist()
    out[schema.IMAGE] = np.stack([np.frombuffer(b, np.uint8)
                                  for b in t.column(schema.IMAGE).to_pylist()])
    return out


def test_the_background_class_is_class_C(hardened):
    cfg, C = hardened["cfg"], len(CLASSES)
    assert read_model(harden.model_uri(cfg.output, "plain", 0)).classes == CLASSES
    for r in range(1, ROUNDS + 1):
        bg = read_model(harden.model_uri(cfg.output, "background", r))
        assert bg.classes == [*CLASSES, schema.BACKGROUND] and bg.C == C + 1
        assert bg.manifest[schema.M_CLASS_NAMES][C] == schema.BACKGROUND
        assert read_model(harden.model_uri(cfg.output, "adversarial", r)).classes == CLASSES
    # the background class learnt its images: most of round 1's are called class C
    bg1 = harden.model_uri(cfg.output, "background", 1)
    assert (scores(bg1, fooling(cfg, "background", 1)[schema.IMAGE]).argmax(1) == C).mean() > 0.5


def test_fooling_images_are_made_from_training_images_only(hardened):
    cfg = hardened["cfg"]
    train_ids, val_ids = (set(split(hardened["data"], s)[0]) for s in ("train", "val"))
    for mode in schema.HARDEN_MODES:
        used = [fooling(cfg, mode, r)[schema.IMAGE_ID] for r in range(1, ROUNDS + 1)]
        assert all(set(ids) <= train_ids for ids in used) and all(len(ids) > 6 for ids in used)
        assert len({i for ids in used for i in ids}) == sum(map(len, used))  # never twice
        assert all(set(fooling(cfg, mode, r, fresh=True)[schema.IMAGE_ID]) <= val_ids
                   for r in range(1, ROUNDS + 1))


@pytest.mark.parametrize("fresh", [False, True])
def test_each_fooling_image_is_its_target_for_the_model_it_attacked(hardened, fresh):
    cfg = hardened["cfg"]
    ids, X, y = split(hardened["data"], "val" if fresh else "train")
    index = {k: i for i, k in enumerate(ids)}
    for mode in schema.HARDEN_MODES:
        for r in range(1, ROUNDS + 1):
            f = fooling(cfg, mode, r, fresh)
            attacked = harden.model_uri(cfg.output, mode, r - 1)
            assert (f[schema.ATTACKED_ROUND] == r - 1).all()
            assert (scores(attacked, f[schema.IMAGE]).argmax(1) == f[schema.TARGET]).all()
            src = X[[index[i] for i in f[schema.IMAGE_ID]]]
            assert (scores(attacked, src).argmax(1) != f[schema.TARGET]).all()  # had to move
            linf = np.abs(f[schema.IMAGE].astype(int) - src.astype(int)).max(1)
            assert (linf == f[schema.LINF]).all() and (linf > 0).all()
            assert (f[schema.LABEL] == y[[index[i] for i in f[schema.IMAGE_ID]]]).all()
            assert (f[schema.TARGET] < len(CLASSES)).all()  # never the background


def test_fooling_images_are_learnt_as_background_or_as_their_sources_class():
    labels = np.array([2, 0, 1])
    assert rounds.training_labels("background", labels, 3).tolist() == [3, 3, 3]
    assert rounds.training_labels("adversarial", labels, 3).tolist() == [2, 0, 1]
    with pytest.raises(ConfigError, match="unknown mode"):
        rounds.training_labels("plain", labels, 3)


def test_targets_are_drawn_among_the_other_real_classes():
    rng = np.random.default_rng(0)
    y = np.arange(1000) % 5
    t = rounds.draw_targets(y, np.zeros((1000, 6)), 5, "uniform", rng)
    assert (t != y).all() and set(t) == set(range(5))
    S = np.array([[5.0, 4.0, 1.0, 9.0], [0.0, 1.0, 2.0, 9.0]])  # class 3: the background
    assert rounds.draw_targets(np.array([0, 2]), S, 3, "runner-up", rng).tolist() == [1, 1]


def test_the_measurements_match_numpy(hardened):
    cfg, C = hardened["cfg"], len(CLASSES)
    rows = read_harden(cfg.output)
    assert [(r.mode, r.round) for r in rows] == [
        ("plain", 0), *((m, r) for m in schema.HARDEN_MODES for r in range(1, ROUNDS + 1))]
    _, Xv, yv = split(hardened["data"], "val")
    total = {}
    for row in rows:
        S = scores(row.model, Xv)  # every class of the model: background counts as wrong
        top5 = np.argsort(-S, 1)[:, :5]
        assert row.val_top1 == pytest.approx(np.mean(S.argmax(1) == yv))
        assert row.val_top5 == pytest.approx(np.mean((top5 == yv[:, None]).any(1)))
        assert row.pairs == cfg.limit_images * C and row.classes == read_model(row.model).C
        assert row.median_linf is not None and row.p90_linf >= row.median_linf > 0
        if row.round == 0:
            assert row.background_trained is None and row.fooled_added == 0
            continue
        trained, fresh = fooling(cfg, row.mode, row.round), fooling(cfg, row.mode, row.round, True)
        total[row.mode] = total.get(row.mode, 0) + len(trained[schema.LABEL])
        assert (row.fooled_added, row.fooled_total) == (len(trained[schema.LABEL]), total[row.mode])
        pred = scores(row.model, fresh[schema.IMAGE]).argmax(1)
        assert row.fresh_target == pytest.approx(np.mean(pred == fresh[schema.TARGET]))
        assert row.fresh_label == pytest.approx(np.mean(pred == fresh[schema.LABEL]))
        if row.mode == "adversarial":
            assert row.background_trained is None and row.background_fresh is None
            continue
        assert row.background_fresh == pytest.approx(np.mean(pred == C))
        caught = scores(row.model, trained[schema.IMAGE]).argmax(1) == C
        assert row.background_trained == pytest.approx(caught.mean())


def test_the_median_linf_is_above_the_certified_bound(hardened):
    """Exact's minimal L-inf is at least Hoelder's bound max_k (s_k - s_t) / ||W_t - W_k||_1."""
    cfg, C = hardened["cfg"], len(CLASSES)
    _, Xv, _ = split(hardened["data"], "val")
    for row in read_harden(cfg.output):
        m = read_model(row.model)
        S = scores(row.model, Xv[: cfg.limit_images])
        bounds = []
        for t in range(C):
            dist = np.abs(m.W[t][None].astype(np.float64) - m.W).sum(1)
            gap = np.maximum(S - S[:, [t]], 0)
            gap[:, t] = 0
            moved = S.argmax(1) != t
            bounds += list((gap / np.where(dist > 0, dist, np.inf)).max(1)[moved])
        assert row.median_linf >= np.floor(np.median(bounds))


def test_the_frontier_reads_the_rounds(hardened, tmp_path):
    cfg = hardened["cfg"]
    out = str(tmp_path / "frontier")
    m = frontier.run(frontier.Settings(harden=(cfg.output,), output=out,
                                       limit_images=cfg.limit_images))
    rows = tables.read_frontier(out)
    assert [r.series for r in rows] == [schema.HARDEN_PLAIN, *(
        mode for mode in schema.HARDEN_MODES for _ in range(ROUNDS))]
    assert [r.median_linf for r in rows] == [r.median_linf for r in read_harden(cfg.output)]
    assert not os.path.exists(os.path.join(out, frontier.ATTACKS_DIR))  # measured by harden
    curves = frontier.curves(rows)
    assert list(curves) == list(schema.HARDEN_MODES)
    assert [p.round for p in curves["background"]] == list(range(ROUNDS + 1))
    assert os.path.getsize(os.path.join(out, frontier.FIGURE)) > 0 and m["rows"]
    with pytest.raises(ConfigError, match="limit-images"):
        frontier.run(frontier.Settings(harden=(cfg.output,), output=str(tmp_path / "f2"),
                                       limit_images=cfg.limit_images + 1))


def test_classes_keeps_the_first_k_classes_of_the_data(hardened):
    from common.dataset import open_ingest

    data = hardened["data"]
    ids, _, y = split(data, "train")
    part = harden.read_split(data, open_ingest(data), "train", 2)
    assert part.ids.tolist() == [i for i, k in zip(ids, y) if k < 2]
    assert part.y.tolist() == [k for k in y if k < 2] and len(part.X) == len(part.y)


def test_a_frontier_table_from_before_the_series_reads_as_l2_and_robust(tmp_path):
    rows = [tables.FrontierRow(sweep="/s", reg=0.1, robust_eps=e, val_top1=0.9, val_top5=1.0,
                               method="exact", median_linf=3.0, success_rate=1.0, pairs=4,
                               model=f"/m{e}", attack="/a") for e in (0.0, 8.0)]
    out = str(tmp_path)
    storage.write_manifest(out, {schema.M_KIND: "frontier",
                                 schema.M_FILES: tables.write_frontier(out, rows)})
    path = os.path.join(out, f"{schema.FRONTIER_TABLE}.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["series", "round"]), path)
    assert tables.read_frontier(out) == rows and [r.series for r in rows] == ["L2", "robust"]
    pq.write_table(table.drop_columns(["round"]), path)  # half of the new columns: damaged
    with pytest.raises(ConfigError, match="no column round"):
        tables.read_frontier(out)


@pytest.mark.parametrize("change, message", [
    ({"modes": ("background", "noise")}, "--modes"),
    ({"rounds": -1}, "--rounds"),
    ({"classes": 1}, "--classes"),
    ({"images_per_round": 100}, "fooling images need"),
    ({"epochs": 0}, "--epochs"),
])
def test_bad_settings_are_refused_before_anything_is_written(hardened, tmp_path, change,
                                                             message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        harden.run(harden.Settings(data=hardened["data"], output=str(out), **change))
    assert not out.exists()
