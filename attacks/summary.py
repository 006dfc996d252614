"""Summary tables of the fooling results, read back from the stored pairs (pyarrow and numpy).

    python -m attacks.summary --results out/fooling       # print a finished output's summary

Five tables, written by the attack job under ``summary/``, one Parquet file each
(``targets.parquet``, ...):
- ``targets``: per origin, method and target (``target_name`` beside it): pairs, fooled, success
  rate, and over the fooled pairs that had to move (``had_to_move``: the model did not already
  say the target) the mean and quantiles of strength, linf and l2, the median certified
  L-inf and L2 bounds and the median ratios linf / bound_linf and l2 / bound_l2 (how far the
  attack is from the provable minimum).
- ``methods``: per origin and method: the same counts, the quantiles of strength and linf (exact:
  both live on a grid) and the mean l2 over the pairs that had to move.
- ``budget``: per origin and method, for each L-inf budget 0..255 the fraction of all pairs fooled
  within it: the "success vs budget" curve; and the fraction whose certified bound is within it,
  which no attack can exceed.
- ``budget_l2``: the same against L2 budgets (the ``l2`` column; ``bound_l2`` certifies, and is
  the true minimum where exact-l2 ran), on a fixed grid of round budgets (0, then 1.00, 1.05, ...,
  9.95 times each power of ten up to 10^5), up to the largest value of the origin's pairs.
  Outputs written before it lack it: read_summary then leaves it out.
- ``sources``: per method and source class of the validation images (``label``, and
  ``source_name`` beside it): pairs, success rate, mean linf of the pairs that had to move (which
  classes resist).
- ``strength``: per origin and method, the histogram of the strength the fooled pairs needed.

Partitions are read one (method, target) folder at a time, so memory does not grow with the run.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attacks.pairs import Pairs, names_column, open_attack
from common import cli, schema, storage
from common.errors import ConfigError
from common.schema import TEMPLATE_RES

QUANTILES = schema.QUANTILES
LEVELS = 256  # linf of a stored uint8 image is an integer 0..255
GRID = 255 * TEMPLATE_RES + 1  # strengths are multiples of 1 / TEMPLATE_RES in 0..255
READ_THREADS = 16
STATS = [schema.ORIGIN, schema.LABEL, schema.PRED, schema.SUCCESS, schema.STRENGTH, schema.LINF,
         schema.L2, schema.BOUND_LINF, schema.BOUND_L2]
# L2 budgets in pixel levels: 0, then 1.00, 1.05, ..., 9.95 times each power of ten up to 10^5
# (steps of 0.5% to 5%, round numbers). Fixed, so that the partitions' histograms add up without
# a second pass over the pairs; every L2 of a 64x64x3 image (at most 255 * sqrt(12288) = 28,267)
# lies within it. The table keeps the budgets up to the largest its origin's pairs reach.
L2_GRID = np.array([0.0, *(round(m * 10.0**k / 100, 6) for k in range(5)
                           for m in range(100, 1000, 5)), 1e5])


def _quantiles(name: str, values: np.ndarray) -> dict:
    qs = np.quantile(values, QUANTILES) if len(values) else [np.nan] * len(QUANTILES)
    return {schema.quantile_column(name, q): float(v) for q, v in zip(QUANTILES, qs)}


def target_stats(table: pa.Table, method: str, target: int) -> list[dict]:
    """Rows of the targets table for one partition, one per origin, plus histograms for merging."""
    out = []
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in STATS}
    for origin in schema.ORIGINS:
        rows = cols[schema.ORIGIN] == origin
        if not rows.any():
            continue
        fooled = rows & cols[schema.SUCCESS]
        ok = fooled & schema.had_to_move(cols[schema.PRED], target)
        s, linf, l2 = (cols[c][ok].astype(np.float64)
                       for c in (schema.STRENGTH, schema.LINF, schema.L2))
        bound = cols[schema.BOUND_LINF][ok].astype(np.float64)
        ratio = linf[bound > 0] / bound[bound > 0]
        bound_l2 = cols[schema.BOUND_L2][ok].astype(np.float64)
        ratio_l2 = l2[bound_l2 > 0] / bound_l2[bound_l2 > 0]
        row = {schema.ORIGIN: origin, schema.METHOD: method, schema.TARGET: target,
               schema.S_PAIRS: int(rows.sum()), schema.S_FOOLED: int(fooled.sum()),
               schema.S_MOVED: int(ok.sum()),
               schema.S_SUCCESS_RATE: float(fooled.sum() / rows.sum()),
               "strength_mean": float(s.mean()) if len(s) else np.nan,
               **_quantiles("strength", s),
               schema.S_LINF_MEAN: float(linf.mean()) if len(linf) else np.nan,
               **_quantiles("linf", linf),
               schema.S_L2_MEAN: float(l2.mean()) if len(l2) else np.nan, **_quantiles("l2", l2),
               schema.S_BOUND_LINF_MEDIAN: _median(bound),
               schema.S_LINF_RATIO_MEDIAN: _median(ratio),
               schema.S_BOUND_L2_MEDIAN: _median(bound_l2),
               schema.S_L2_RATIO_MEDIAN: _median(ratio_l2),
               "_linf_hist": np.bincount(linf.astype(np.int64), minlength=LEVELS),
               "_budget_hist": np.bincount(cols[schema.LINF][fooled].astype(np.int64),
                                           minlength=LEVELS),
               "_strength_hist": np.bincount(np.rint(s * TEMPLATE_RES).astype(np.int64),
                                             minlength=GRID),
               "_l2_sum": float(l2.sum()),
               # no attack fools a pair within a budget below its certified bound (rounded up)
               "_bound_hist": np.bincount(np.clip(np.ceil(cols[schema.BOUND_LINF][rows]), 0,
                                                  LEVELS).astype(np.int64), minlength=LEVELS + 1),
               "_l2_budget_hist": _l2_hist(cols[schema.L2][fooled]),
               "_l2_bound_hist": _l2_hist(cols[schema.BOUND_L2][rows]),
               **_by_label(cols, rows, fooled, ok)}
        out.append(row)
    return out


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if len(values) else np.nan


def _l2_hist(values: np.ndarray) -> np.ndarray:
    """Counts on L2_GRID: bin i holds the values in (L2_GRID[i-1], L2_GRID[i]], so that the
    cumulative sum at i counts those within budget L2_GRID[i]; the last bin, those beyond the
    grid (and NaN)."""
    i = np.searchsorted(L2_GRID, values.astype(np.float64), "left")
    return np.bincount(i, minlength=len(L2_GRID) + 1).astype(np.int32)


def _by_label(cols: dict, rows, fooled, ok) -> dict:
    """Per source class (validation images): pairs, fooled, moved, and the sum of their linf."""
    labels = np.maximum(cols[schema.LABEL], 0)  # noise rows (label -1) are not in ``rows`` of val
    linf = cols[schema.LINF].astype(np.float64)
    return {"_label_pairs": np.bincount(labels[rows]),
            "_label_fooled": np.bincount(labels[fooled]),
            "_label_moved": np.bincount(labels[ok]),
            "_label_linf": np.bincount(labels[ok], weights=linf[ok])}


def _sum_padded(arrays) -> np.ndarray:
    out = np.zeros(max(len(a) for a in arrays))
    for a in arrays:
        out[:len(a)] += a
    return out


def _hist_quantiles(name: str, hist: np.ndarray, scale: float) -> dict:
    """Exact quantiles (numpy's default, linear) of values given as a histogram on a grid."""
    total = hist.sum()
    if total == 0:
        return {schema.quantile_column(name, q): np.nan for q in QUANTILES}
    cum = np.cumsum(hist)
    out = {}
    for q in QUANTILES:
        pos = q * (total - 1)
        lo = np.searchsorted(cum, np.floor(pos), "right")
        hi = np.searchsorted(cum, np.ceil(pos), "right")
        value = (lo + (hi - lo) * (pos - np.floor(pos))) / scale
        out[schema.quantile_column(name, q)] = float(value)
    return out


def method_tables(rows: list[dict]) -> dict[str, pa.Table]:
    """Merge per-target rows into the methods, budget, sources and strength tables."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r[schema.ORIGIN], r[schema.METHOD]), []).append(r)
    methods, budget, sources, strength = [], [], [], []
    for (origin, method), rs in sorted(groups.items()):
        pairs_, fooled = sum(r[schema.S_PAIRS] for r in rs), sum(r[schema.S_FOOLED] for r in rs)
        moved = sum(r[schema.S_MOVED] for r in rs)
        linf_h = np.sum([r["_linf_hist"] for r in rs], axis=0)
        strength_h = np.sum([r["_strength_hist"] for r in rs], axis=0)
        methods.append({schema.ORIGIN: origin, schema.METHOD: method, schema.S_PAIRS: pairs_,
                        schema.S_FOOLED: fooled, schema.S_MOVED: moved,
                        schema.S_SUCCESS_RATE: fooled / pairs_,
                        **_hist_quantiles("strength", strength_h, TEMPLATE_RES),
                        **_hist_quantiles("linf", linf_h, 1),
                        schema.S_L2_MEAN: (sum(r["_l2_sum"] for r in rs) / moved if moved
                                           else np.nan)})
        curve = np.cumsum(np.sum([r["_budget_hist"] for r in rs], axis=0)) / pairs_
        bound = np.cumsum(np.sum([r["_bound_hist"] for r in rs], axis=0)) / pairs_
        budget += [{schema.ORIGIN: origin, schema.METHOD: method, schema.S_BUDGET: b,
                    schema.S_FOOLED_FRACTION: float(curve[b]),
                    schema.S_BOUND_FRACTION: float(bound[b])}
                   for b in range(LEVELS)]
        strength += [{schema.ORIGIN: origin, schema.METHOD: method, "strength": i / TEMPLATE_RES,
                      schema.S_COUNT: int(n)} for i, n in enumerate(strength_h) if n]
        if origin == "val":
            sources += _source_rows(method, rs)
    return {"methods": pa.Table.from_pylist(methods), "budget": pa.Table.from_pylist(budget),
            "budget_l2": pa.Table.from_pylist(_l2_budget_rows(groups), schema=BUDGET_L2_SCHEMA),
            "sources": pa.Table.from_pylist(sources, schema=SOURCES_SCHEMA),
            "strength": pa.Table.from_pylist(strength)}


BUDGET_L2_SCHEMA = pa.schema([(schema.ORIGIN, pa.string()), (schema.METHOD, pa.string()),
                              (schema.S_BUDGET, pa.float64()),
                              (schema.S_FOOLED_FRACTION, pa.float64()),
                              (schema.S_BOUND_FRACTION, pa.float64())])


def _l2_budget_rows(groups: dict[tuple, list[dict]]) -> list[dict]:
    """The budget_l2 table: per (origin, method), for each L2 budget on L2_GRID the fraction of
    all pairs fooled within it and the fraction whose bound_l2 is within it; every method of an
    origin on the same budgets, up to the first that holds all of the origin's values."""
    sums = {key: [np.sum([r[h] for r in rs], axis=0)
                  for h in ("_l2_budget_hist", "_l2_bound_hist")] for key, rs in groups.items()}
    out = []
    for (origin, method), rs in sorted(groups.items()):
        reached = [np.flatnonzero(h[:len(L2_GRID)]) for (o, _), hs in sums.items() if o == origin
                   for h in hs]
        top = max([1, *(int(r[-1]) for r in reached if len(r))])
        pairs_ = sum(r[schema.S_PAIRS] for r in rs)
        curve, bound = (np.cumsum(h) / pairs_ for h in sums[origin, method])
        out += [{schema.ORIGIN: origin, schema.METHOD: method,
                 schema.S_BUDGET: float(L2_GRID[i]), schema.S_FOOLED_FRACTION: float(curve[i]),
                 schema.S_BOUND_FRACTION: float(bound[i])} for i in range(top + 1)]
    return out


SOURCES_SCHEMA = pa.schema([(schema.ORIGIN, pa.string()), (schema.METHOD, pa.string()),
                            (schema.LABEL, pa.int16()), (schema.S_PAIRS, pa.int64()),
                            (schema.S_FOOLED, pa.int64()), (schema.S_SUCCESS_RATE, pa.float64()),
                            (schema.S_LINF_MEAN, pa.float64())])


def _source_rows(method: str, rs: list[dict]) -> list[dict]:
    """The sources table of one method: how hard each class's images are to move anywhere."""
    pairs_, fooled, moved, linf = (_sum_padded([r[k] for r in rs]) for k in (
        "_label_pairs", "_label_fooled", "_label_moved", "_label_linf"))
    return [{schema.ORIGIN: "val", schema.METHOD: method, schema.LABEL: label,
             schema.S_PAIRS: int(pairs_[label]), schema.S_FOOLED: int(fooled[label]),
             schema.S_SUCCESS_RATE: float(fooled[label] / pairs_[label]),
             schema.S_LINF_MEAN: float(linf[label] / moved[label]) if moved[label] else np.nan}
            for label in range(len(pairs_)) if pairs_[label]]


def summarize(pairs: Pairs, methods, targets, names) -> dict[str, pa.Table]:
    """Read every (method, target) partition's statistics (no images) and build the tables;
    ``names``: a name per class (``schema.class_names``), beside the targets and source classes.

        >>> m = open_attack("s3://bucket/fooling")
        >>> tables = summarize(Pairs.open("s3://bucket/fooling", m), ["sign"], range(1000),
        ...                    schema.class_names(m))
        >>> tables["targets"].to_pandas()       # one row per (origin, method, target)
    """
    jobs = [(m, int(t)) for m in methods for t in targets]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = pool.map(lambda mt: target_stats(pairs.read(*mt, STATS), *mt), jobs)
        rows = [r for part in parts for r in part]
    per_target = pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")}
                                       for r in rows])
    tables = {"targets": per_target, **method_tables(rows)}
    for table, index, name in (("targets", schema.TARGET, schema.TARGET_NAME),
                               ("sources", schema.LABEL, schema.SOURCE_NAME)):
        t = tables[table]
        tables[table] = t.add_column(t.schema.get_field_index(index) + 1,
                                     pa.field(name, schema.CLASS_NAME, nullable=False),
                                     names_column(t.column(index).to_numpy(), names))
    return tables


def moved_median(pairs: Pairs, method: str, column: str, origin: str = "val") -> float | None:
    """The exact median of ``column`` (e.g. l2) over a method's fooled pairs of ``origin`` that
    had to move, read from every target's pairs (that column and three small ones); None when
    none was fooled. For a bounded run (attacks.frontier's first images): it holds the values."""
    def values(target: int) -> np.ndarray:
        t = pairs.read(method, target, [schema.ORIGIN, schema.PRED, schema.SUCCESS, column])
        c = {k: t.column(k).to_numpy(zero_copy_only=False) for k in t.column_names}
        ok = (c[schema.ORIGIN] == origin) & c[schema.SUCCESS] & schema.had_to_move(
            c[schema.PRED], target)
        return c[column][ok].astype(np.float64)

    targets = sorted(t for m, t in pairs.files if m == method)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        got = np.concatenate([np.empty(0), *pool.map(values, targets)])
    return float(np.median(got)) if len(got) else None


@dataclass(frozen=True)
class Settings:
    results: str = field(metadata={"help": "a finished attack output: local path or s3://"})

    RENAMED = {"output": "results"}  # the old name, refused in one line


def read_summary(results: str, manifest: dict | None = None) -> dict[str, pa.Table]:
    """The summary tables of a finished attack output (``manifest``: its manifest, from
    ``open_attack``), each checked against the size and sha256 its manifest records and for the
    columns its readers use, and its pairs' files against the manifest (attacks/pairs.py); a
    missing, damaged or incomplete table or file is one ConfigError naming it. A table of
    schema.SUMMARY_OPTIONAL that the manifest does not list (an output written before it, e.g.
    ``budget_l2``) is left out of the result."""
    m = manifest if manifest is not None else open_attack(results, needs=(schema.M_FILES,))
    Pairs.open(results, m)
    listed = {f["path"]: f for f in m[schema.M_FILES]}
    out = {}
    for name, file in schema.SUMMARY_TABLES.items():
        rel = f"{schema.SUMMARY_DIR}/{file}"
        uri = storage.join(results, rel)
        if name in schema.SUMMARY_OPTIONAL and rel not in listed:
            continue  # an output written before the table: its readers show what it has
        raw = _verified(uri, listed.get(rel))
        # parsed from a copy that Arrow owns, never from a Python object (io.BytesIO, or bytes
        # wrapped by pa.py_buffer): pyarrow's I/O threads touch such an object, and one doing
        # so while the interpreter exits is ended mid-C++ ("terminate called without an active
        # exception", exit status 134)
        copy = pa.BufferOutputStream()
        copy.write(raw)
        try:
            table = pq.read_table(pa.BufferReader(copy.getvalue()))
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None
        missing = [c for c in schema.SUMMARY_COLUMNS[name] if c not in table.column_names]
        if missing:
            raise ConfigError(f"{uri} lacks the columns {', '.join(missing)}")
        out[name] = table
    return out


def _verified(uri: str, entry: dict | None) -> bytes:
    """The bytes of a listed summary table, after checking them against its manifest entry."""
    if entry is None or not isinstance(entry.get("sha256"), str):
        raise ConfigError(f"{uri}: the manifest records no sha256 of it: not this attack's "
                          "table, or written before tables had one (rerun the attack)")
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"{uri} is missing: the attack output is incomplete") from None
    except OSError as e:
        raise ConfigError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None
    if len(raw) != entry["bytes"]:
        raise ConfigError(f"{uri} has {len(raw)} bytes, its manifest says {entry['bytes']}: "
                          "the file is damaged")
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ConfigError(f"{uri}: damaged: its sha256 is not the one its manifest records")
    return raw


def describe(output: str) -> str:
    """A few lines on a finished attack output: per method, success and perturbation sizes."""
    m = open_attack(output, needs=(schema.M_COUNTS, schema.M_TIMINGS, schema.M_FILES))
    methods = read_summary(output, m)["methods"]
    c = m[schema.M_COUNTS]
    lines = [f"{output}: {c['pairs']} pairs = ({c['val_images']} validation + {c['noise_images']} "
             f"noise images) x {c['targets']} targets x {len(c['methods'])} methods, "
             f"{m[schema.M_TIMINGS]['total_s']:.0f} s"]
    q50, q90 = (schema.quantile_column(schema.LINF, q) for q in (0.5, 0.9))
    for r in methods.to_pylist():
        lines.append(f"  {r[schema.ORIGIN]:5s} {r[schema.METHOD]:9s} fooled "
                     f"{r[schema.S_SUCCESS_RATE]:6.1%} of {r[schema.S_PAIRS]} pairs; L-inf "
                     f"median {r[q50]:.1f}, 90% {r[q90]:.1f}; mean L2 {r[schema.S_L2_MEAN]:.0f}")
    pngs = [storage.join(output, f["path"]) for f in m[schema.M_FILES]
            if f["path"].endswith(".png")]
    lines.append("  pictures: " + ", ".join(pngs))
    return "\n".join(lines)


def run(cfg: Settings) -> None:
    print(describe(cfg.results))


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
