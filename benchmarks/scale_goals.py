"""The rehearsal's goals (judged, printed, never asserted) and its projection to ImageNet's size.

    >>> goals(figures)               # {"training >= 0.8x the plain loop": True, ...}
    >>> project(settings, Settings(), figures)   # each stage at the default sizes, the disk

The projection is linear in what each stage processes, with the fixed part measured where the
run tells it apart: training's start-up and validation (the run's time outside its epoch), the
attack's start-up (its time outside its parts), each downstream tool's intercept (a line through
its two measured sizes, the slice and the built output; never a falling line), the build's
start-up (its time outside writing and summarizing).
"""

from __future__ import annotations

import numpy as np

from benchmarks import scale_data
from benchmarks.scale_pairs import kept

GB = 1e9
TOOLS = ("summary", "report", "transfer", "show")  # the downstream tools, each a subprocess
PER_PAIR = ("summary", "transfer")  # read every pair (or list every file); the others, images
RSS_TRAIN_MB, RSS_TOOL_MB = 6 * 1024, 4 * 1024
LINEAR_SLACK = 1.25  # "no worse than linear": the big run within 1.25x the slice's time per row
SHOW_S, SHOW_GROWTH_MB = 2.0, 64  # show: one pair in 2 s, reading no more on a bigger output
HOURS_2 = 2 * 3600


def rows(figures: dict) -> tuple[int, int]:
    """(pairs of the slice, pairs of the built output), all methods."""
    s, methods = figures["settings"], len(figures["attack_pairs_per_s"])
    return s["attack_images"] * s["classes"] * methods, s["pairs_rows"] * methods


def goals(f: dict) -> dict[str, bool]:
    small, big = rows(f)
    s = f["slice"]
    return {
        "training >= 0.8x the plain loop": f["train_samples_per_s"]
        >= 0.8 * f["plain_samples_per_s"],
        "training: no process above 6 GB RSS": f["train_peak_rss_mb"] <= RSS_TRAIN_MB,
        "every downstream tool within 4 GB RSS": all(f[f"{t}_peak_rss_mb"] <= RSS_TOOL_MB
                                                     for t in TOOLS),
        "downstream time no worse than linear in rows": all(
            f[f"{t}_s"] <= LINEAR_SLACK * s[f"{t}_s"] * big / small
            for t in ("summary", "report", "transfer")),
        "show: one pair under 2 s": f["show_s"] < SHOW_S,
        "show: no scan (reads no more on the built output than on the slice, within 64 MB)":
            f["show_read_mb"] - s["show_read_mb"] < SHOW_GROWTH_MB,
        "the whole rehearsal under 2 hours": f["total_s"] < HOURS_2,
        "projected at ImageNet's size under 2 hours":
            f.get("projection", {}).get("total_s", 0) < HOURS_2,
    }


def _tool(f: dict, name: str, full: tuple[int, int]) -> float:
    """A tool's seconds at the full size: the line through its two measured sizes, in pairs
    (summary, transfer: every pair) or in images (report, show: a bounded number of
    partitions, each holding every image once)."""
    small, big = _sizes(f, name)
    at = full[1] if name in PER_PAIR else full[0]
    t_small, t_big = f["slice"][f"{name}_s"], f[f"{name}_s"]
    slope = max(0.0, (t_big - t_small) / (big - small)) if big > small else t_big / big
    return t_big + slope * (at - big)


def _sizes(f: dict, name: str) -> tuple[int, int]:
    """(slice, built output) in the unit a tool's time grows with."""
    if name in PER_PAIR:
        return rows(f)
    s = f["settings"]
    return s["attack_images"], s["pairs_rows"] // s["classes"]


def project(cfg, full, f: dict) -> dict:
    """Each stage's seconds, and the bytes written, at the sizes of ``full`` (the defaults:
    ImageNet's) from those measured with the settings ``cfg``."""
    st = f["stage_s"]
    methods = len(f["attack_pairs_per_s"])
    epoch = f["train_epoch_s"]
    train = st["train"] - epoch + epoch * full.train_rows / cfg.train_rows
    rates = f["attack_pairs_per_s"]
    slice_pairs = cfg.attack_images * cfg.classes
    in_parts = sum(slice_pairs / r for r in rates.values())
    full_slice = full.attack_images * full.classes
    out = {
        "data": st["data"] * (full.train_rows + full.val_rows) / (cfg.train_rows + cfg.val_rows),
        "train": train,
        "plain": st["plain"] * min(full.train_rows, full.plain_rows) / f["plain_rows"],
        "attack": st["attack"] - in_parts + sum(full_slice / r for r in rates.values()),
        "build": st["build"] + (f["build_write_s"] + f["summary_tables_s"])
        * (full.pairs_rows / cfg.pairs_rows - 1),
        **{t: _tool(f, t, (full.pairs_rows // full.classes, full.pairs_rows * methods))
           for t in TOOLS},
    }
    out = {k: round(v, 1) for k, v in out.items()}
    return {"stage_s": out, "total_s": round(sum(out.values()), 1),
            "bytes": round(f["data_bytes"] * (full.train_rows + full.val_rows)
                           / (cfg.train_rows + cfg.val_rows)
                           + _pairs_bytes(f, full.pairs_rows // full.classes, full.classes)
                           + _pairs_bytes(f, full.attack_images, full.classes)),
            "attack_all_pairs_h": round(sum(full.val_rows * full.classes / r
                                            for r in rates.values()) / 3600, 1)}


def _pairs_bytes(f: dict, images: int, classes: int) -> float:
    """Bytes of an attack output of ``images`` x ``classes`` pairs per method: the measured
    bytes of a row besides its image, plus the image where the attack keeps it."""
    share = kept(f["attack_keep"], np.arange(images)).mean()
    D = scale_data.D
    return sum(images * classes * (per_row - f["pairs_image_share"] * D + share * D)
               for per_row in f["pairs_bytes_per_row"].values())


def describe(f: dict) -> str:
    """The figures, the goals with PASS or FAIL, and the projection, as lines to print."""
    s = f["settings"]
    lines = [f"rehearsal: {s['train_rows']:,} training and {s['val_rows']:,} validation images, "
             f"{s['classes']:,} classes; attack slice {s['attack_images']:,} images x every "
             f"target; built output {s['pairs_rows']:,} rows per method; {s['cpus']} CPUs"]
    for key, value in f.items():
        if key not in ("settings", "goals", "projection", "slice"):
            lines.append(f"  {key:28s} {value}")
    lines.append(f"  {'on the slice':28s} {f['slice']}")
    lines.append("goals:")
    lines += [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in f["goals"].items()]
    p = f["projection"]
    lines.append(f"projected at ImageNet's size (linear): {p['total_s'] / 3600:.1f} h "
                 f"({', '.join(f'{k} {v:,.0f} s' for k, v in p['stage_s'].items())}), "
                 f"{p['bytes'] / GB:,.0f} GB written; the attack on every validation image x "
                 f"every target: {p['attack_all_pairs_h']:,} h here")
    return "\n".join(lines)
