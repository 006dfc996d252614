"""The data contracts between the jobs (docs/design.md), defined once and imported everywhere.

Column names, Arrow types and manifest keys live here and nowhere else.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata

import pyarrow as pa

# --- Ingested dataset: <out>/{train,val}/*.parquet ---------------------------------------------
IMAGE_ID = "image_id"  # file stem, e.g. ILSVRC2012_val_00000001
LABEL = "label"  # int16 index of the WNID in sorted order
WNID = "wnid"
IMAGE = "image"  # exactly H*W*3 bytes, RGB uint8, row-major HWC
SOURCE = "source"  # path of the input file relative to the source root
ORIG_WIDTH = "orig_width"
ORIG_HEIGHT = "orig_height"

IMAGES_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(LABEL, pa.int16(), nullable=False),
        pa.field(WNID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(ORIG_WIDTH, pa.int32(), nullable=False),
        pa.field(ORIG_HEIGHT, pa.int32(), nullable=False),
    ]
)

# --- Quarantine: <out>/quarantine/*.parquet ---
SPLIT = "split"
REASON = "reason"
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
    ]
)

SPLITS = ("train", "val")
QUARANTINE_DIR = "quarantine"

# --- Manifest keys (<out>/manifest.json) ---
M_KIND = "kind"  # which job wrote it: "ingest", "train", "attack"
M_CLASSES = "classes"  # WNIDs in label order
M_CLASS_NAMES = "class_names"
M_IMAGE_SHAPE = "image_shape"  # [H, W, 3]
M_COUNTS = "counts"  # {split: {seen, written, quarantined}}
M_PIXEL_MEAN = "pixel_mean"  # per channel, training split, pixels in 0..255
M_PIXEL_STD = "pixel_std"
M_RESIZE = "resize"
M_CONFIG = "config"
M_VERSIONS = "versions"
M_TIMINGS = "timings"
M_FILES = "files"  # [{path, rows, bytes}] relative to the output
M_SOURCE = "source"
M_CREATED = "created"
M_IDENTITY = "identity"  # the identity record of the run (common/lifecycle.py, _identity.json)


def stamp(config: dict, timings: dict) -> dict:
    """What every job's manifest says of its run: the settings, timings, versions and when."""
    return {M_CONFIG: config, M_TIMINGS: timings, M_VERSIONS: versions(),
            M_CREATED: datetime.now(UTC).isoformat(timespec="seconds")}


def versions() -> dict:
    """Versions of the interpreter and the libraries whose behaviour the outputs depend on."""
    out = {"python": platform.python_version()}
    for dist in ("ray", "pyarrow", "pillow", "numpy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# --- Model: <out>/weights.npz, metrics.json, templates.png, manifest.json ---
# scores = x @ W.T + b, x the flattened HWC image as float32 in 0..255 (preprocessing folded in)
WEIGHTS_FILE = "weights.npz"
W_KEY, B_KEY, CLASSES_KEY = "W", "b", "classes"  # float32 (C, D), float32 (C,), str (C,)
METRICS_FILE = "metrics.json"  # {"history": [{epoch, train_loss, val_loss, val_top1, val_top5}]}
TEMPLATES_FILE = "templates.png"
SWEEP_TABLE = "sweep"  # a sweep's <out>/sweep.parquet and sweep.md: one row per (reg, robust_eps)
CHECKPOINTS_DIR = "checkpoints"  # the Ray Train run folder: <out>/checkpoints/epoch-NNNN/
CHECKPOINT_FILE = "model.pt"  # torch.save of plain data; load with weights_only=True
M_DATA = "data"  # manifest: the ingest output the model was trained on
M_FINAL = "final"  # manifest: the last epoch's metrics (as in metrics.json's history)
M_INITIAL_LOSS = "initial_loss"  # manifest: loss of the first batch, near ln(C)
M_WEIGHT_NORMS = "weight_norms"  # manifest: {"W": ||W|| as trained, "W_pixels": of weights.npz}

# --- Fooling results: <out>/pairs/ (Hive-partitioned), summary/, figures/, manifest.json ---------
ORIGIN = "origin"  # "val" or "noise"
PRED = "pred"  # the model's class for the original image
TARGET = "target"
METHOD = "method"
STRENGTH = "strength"  # the method's step size that was used, pixel units
LINF = "linf"  # distance of the stored uint8 image from the original, pixel units
L2 = "l2"
FOOLED_PRED = "fooled_pred"  # the model's class for the stored uint8 image
SUCCESS = "success"  # fooled_pred == target
P_TARGET = "p_target"  # softmax probability of the target on the stored image
BOUND_LINF = "bound_linf"  # certified lower bounds on the distance to the target's region
BOUND_L2 = "bound_l2"
# The classes by name (class_names below), beside their indices: dictionary-encoded strings, so
# that a file holds each name once per row group, not once per row
TARGET_NAME = "target_name"  # the name of TARGET
SOURCE_NAME = "source_name"  # the name of LABEL, the image's class in the data; null for noise
HAD_TO_MOVE = "had_to_move"  # had_to_move(pred, target), below
CLASS_NAME = pa.dictionary(pa.int16(), pa.string())
PAIRS_DIR, SUMMARY_DIR, FIGURES_DIR = "pairs", "summary", "figures"


def class_names(manifest: dict) -> list[str]:
    """A name per class of an ingest, model or attack manifest: the data's names
    (``LOC_synset_mapping.txt``'s, e.g. ``tench, Tinca tinca``), the WNID where it has none."""
    names = manifest.get(M_CLASS_NAMES) or manifest[M_CLASSES]
    return [n or w for n, w in zip(names, manifest[M_CLASSES])]


def had_to_move(pred, target):
    """Whether a pair had to move: the model did not already predict the target for the original
    image (``pred != target``; numpy or pandas values, or ints). The others are fooled unchanged,
    at L-inf 0; the summaries' L-inf, L2 and strength statistics are over the pairs that had to
    move."""
    return pred != target

PAIRS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(ORIGIN, pa.string(), nullable=False),
        pa.field(LABEL, pa.int16(), nullable=False),  # -1 for noise
        pa.field(PRED, pa.int16(), nullable=False),
        pa.field(TARGET, pa.int16(), nullable=False),
        pa.field(METHOD, pa.string(), nullable=False),
        pa.field(STRENGTH, pa.float32(), nullable=False),
        pa.field(LINF, pa.float32(), nullable=False),
        pa.field(L2, pa.float32(), nullable=False),
        pa.field(FOOLED_PRED, pa.int16(), nullable=False),
        pa.field(SUCCESS, pa.bool_(), nullable=False),
        pa.field(P_TARGET, pa.float32(), nullable=False),
        pa.field(BOUND_LINF, pa.float32(), nullable=False),
        pa.field(BOUND_L2, pa.float32(), nullable=False),
        pa.field(TARGET_NAME, CLASS_NAME, nullable=False),
        pa.field(SOURCE_NAME, CLASS_NAME, nullable=True),  # null for noise
        pa.field(HAD_TO_MOVE, pa.bool_(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=True),  # null when images are not kept
    ]
)
# Pairs files written before the names: readable, without these columns (attacks/pairs.py)
PAIRS_NAMED = (TARGET_NAME, SOURCE_NAME, HAD_TO_MOVE)
# The folders pairs/method=<m>/target=<t>/ carry METHOD and TARGET; the files hold the other
# columns (a column in both places makes pyarrow's and pandas' Hive readers refuse the dataset).
# Read them back typed with pairs_partitioning() (below).
PAIRS_PARTITION_SCHEMA = pa.schema(
    [pa.field(METHOD, pa.string(), nullable=False), pa.field(TARGET, pa.int16(), nullable=False)]
)
PAIRS_FILE_SCHEMA = pa.schema(
    [f for f in PAIRS_SCHEMA if f.name not in PAIRS_PARTITION_SCHEMA.names]
)


def with_image_shape(sch: pa.Schema, shape: tuple[int, ...] | list[int]) -> pa.Schema:
    """``sch`` with its image column's layout in Parquet field metadata, so that a reader with
    one file and no manifest can decode the bytes: ``shape`` ``64,64,3``, ``layout`` ``HWC``,
    ``dtype`` ``uint8``, ``channels`` ``RGB`` (row-major)."""
    meta = {"shape": ",".join(map(str, shape)), "layout": "HWC", "dtype": "uint8",
            "channels": "RGB"}
    i = sch.get_field_index(IMAGE)
    return sch.set(i, sch.field(i).with_metadata(meta))


def image_shape_of(field: pa.Field) -> tuple[int, ...] | None:
    """The shape an image column's field metadata records (with_image_shape), or None."""
    shape = (field.metadata or {}).get(b"shape")
    return tuple(int(v) for v in shape.decode().split(",")) if shape else None


def pair_file_schema(method: str, target: int, shape: tuple[int, ...]) -> pa.Schema:
    """A pairs file's schema: its image layout, and its method and target as file metadata, so
    that a file copied out of ``method=<m>/target=<t>/`` still says what it holds."""
    return with_image_shape(PAIRS_FILE_SCHEMA, shape).with_metadata(
        {METHOD: method, TARGET: str(target)})


def pairs_partitioning():
    """The Hive partitioning of ``pairs/`` with its declared types (method string, target
    int16); without it readers guess the target's type (int32 in pyarrow, a category in pandas,
    BIGINT in DuckDB)."""
    import pyarrow.dataset as ds

    return ds.partitioning(PAIRS_PARTITION_SCHEMA, flavor="hive")


METHODS = ("template", "sign", "iterative", "exact", "exact-l2")
TEMPLATE_RES = 8  # the template method's strengths lie on a grid of 1/8 pixel level
ORIGINS = ("val", "noise")
# summary/ tables: per (origin, method, target); per (origin, method); success vs L-inf budget
SUMMARY_TARGETS = "targets.parquet"
SUMMARY_METHODS = "methods.parquet"
SUMMARY_BUDGET = "budget.parquet"  # with the certified bound's curve: no attack does better
SUMMARY_BUDGET_L2 = "budget_l2.parquet"  # the same against L2 budgets, certified by bound_l2
SUMMARY_SOURCES = "sources.parquet"  # per (origin, method, source label) of validation images
SUMMARY_STRENGTH = "strength.parquet"  # per (origin, method) histogram of the strength needed
SUMMARY_TABLES = {"targets": SUMMARY_TARGETS, "methods": SUMMARY_METHODS,
                  "budget": SUMMARY_BUDGET, "budget_l2": SUMMARY_BUDGET_L2,
                  "sources": SUMMARY_SOURCES, "strength": SUMMARY_STRENGTH}
# Tables that outputs written before them lack: read_summary leaves them out of what it returns
SUMMARY_OPTIONAL = ("budget_l2",)
# Their columns, besides ORIGIN, METHOD, TARGET with TARGET_NAME (targets table) and LABEL with
# SOURCE_NAME (sources table):
S_PAIRS, S_FOOLED, S_MOVED = "pairs", "fooled", "moved"  # all pairs; fooled; fooled and had to move
S_SUCCESS_RATE = "success_rate"  # fooled / pairs
S_BUDGET = "budget"  # an L-inf budget 0..255 (budget table); an L2 budget (budget_l2 table)
S_FOOLED_FRACTION = "fooled_fraction"  # of all pairs, fooled within the budget
S_BOUND_FRACTION = "bound_fraction"  # of all pairs, certified bound within the budget
S_COUNT = "count"  # strength table: fooled pairs that needed exactly that strength
S_LINF_MEAN, S_L2_MEAN = "linf_mean", "l2_mean"
# targets table, over the fooled pairs that had to move: the median certified bounds, and the
# median of each norm over its bound (1: the attack found the minimum)
S_BOUND_LINF_MEDIAN, S_LINF_RATIO_MEDIAN = "bound_linf_median", "linf_over_bound_median"
S_BOUND_L2_MEDIAN, S_L2_RATIO_MEDIAN = "bound_l2_median", "l2_over_bound_median"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def quantile_column(name: str, q: float) -> str:
    """``linf`` and 0.5 -> ``linf_q50``: the summary tables' quantile columns."""
    return f"{name}_q{round(q * 100):02d}"


# What each table must hold for its readers (the report, attacks.summary); the names are not
# required, so that tables written before them still read.
SUMMARY_COLUMNS = {
    "targets": [ORIGIN, METHOD, TARGET, S_PAIRS, S_FOOLED, S_SUCCESS_RATE,
                quantile_column(LINF, 0.5)],
    "methods": [ORIGIN, METHOD, S_PAIRS, S_FOOLED, S_MOVED, S_SUCCESS_RATE, S_L2_MEAN,
                *(quantile_column(c, q) for c in (STRENGTH, LINF) for q in QUANTILES)],
    "budget": [ORIGIN, METHOD, S_BUDGET, S_FOOLED_FRACTION, S_BOUND_FRACTION],
    "budget_l2": [ORIGIN, METHOD, S_BUDGET, S_FOOLED_FRACTION, S_BOUND_FRACTION],
    "sources": [ORIGIN, METHOD, LABEL, S_PAIRS, S_FOOLED, S_SUCCESS_RATE, S_LINF_MEAN],
    "strength": [ORIGIN, METHOD, STRENGTH, S_COUNT],
}

# --- The sweep, transfer and frontier tables: their columns are the fields of SweepRow
# (common/sweep.py), TransferRow and FrontierRow (attacks/tables.py) ---------------------------
TRANSFER_TABLE = "transfer"  # <out>/transfer.parquet: one row per (scoring model, method, origin)
FRONTIER_TABLE = "frontier"  # <out>/frontier.parquet: one row per model of the sweeps it attacked

# --- Hardening (training.harden): <out>/round=0/, <out>/<mode>/round=<r>/ (model outputs),
# <out>/<mode>/fooling-<r>.parquet, harden.parquet and harden.md (common/sweep.py, HardenRow) ---
HARDEN_TABLE = "harden"  # one row per (mode, round): accuracy, background shares, exact's L-inf
HARDEN_MODES = ("background", "adversarial")  # fooling images as class C, or as their source's
HARDEN_PLAIN = "plain"  # the mode of round 0: the model trained on the real classes only
BACKGROUND = "background"  # the name of class C of a background-mode model (classes, names)
ATTACKED_ROUND = "attacked_round"  # fooling file: the round of the model the image was made for
HARDEN_FOOLING_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),  # the training image it was made from
        pa.field(LABEL, pa.int16(), nullable=False),  # that image's class in the data
        pa.field(TARGET, pa.int16(), nullable=False),  # a real class, never the background
        pa.field(ATTACKED_ROUND, pa.int16(), nullable=False),
        pa.field(LINF, pa.float32(), nullable=False),  # exact's minimal L-inf, pixel levels
        pa.field(IMAGE, pa.binary(), nullable=False),  # HWC uint8 bytes, as the ingest's
    ]
)
