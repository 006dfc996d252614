# %% [markdown]
# # An attack's results, read without the project
#
# The report's main numbers recomputed from the pairs of one `attacks.fool` output, and one
# gallery, with pyarrow, DuckDB and pandas alone ([analysis.md](analysis.md) has the columns).
# Open it in Jupyter (`jupytext --to notebook`) or VS Code, or run it:
#
#     python docs/analysis.py RESULTS [--png gallery.png]    # RESULTS: a folder or s3://b/prefix
#
# On S3, pyarrow takes the endpoint and the credentials from the standard AWS variables.

# %%
import argparse
import json
import os
import sys

import duckdb
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs

RESULTS, PNG = "demo-out/fooling", None  # in a notebook, set them here
if "ipykernel" not in sys.modules:
    flags = argparse.ArgumentParser(description="The report's numbers and a gallery, from pairs/")
    flags.add_argument("results", help="an attack output: a folder or s3://bucket/prefix")
    flags.add_argument("--png", help="save the gallery here (default: show it)")
    args = flags.parse_args()
    RESULTS, PNG = args.results, args.png


def open_uri(uri: str):
    """A pyarrow filesystem and the path inside it, for a folder or s3://."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(),
                                                               os.path.abspath(uri))


fs, root = open_uri(RESULTS)
with fs.open_input_stream(f"{root}/manifest.json") as f:  # written last: the output is complete
    manifest = json.loads(f.read())
pairs = ds.dataset(f"{root}/pairs", filesystem=fs, format="parquet", partitioning="hive")
methods_run = manifest["counts"]["methods"]
# the report's headline method: exact (the true minimum) when it ran
method = next(m for m in ("exact", "sign", "iterative", "template") if m in methods_run)
print(f"{RESULTS}: {pairs.count_rows():,} pairs, methods {', '.join(methods_run)}")

# %% [markdown]
# ## Each method: success rate and L-inf change
#
# As the report's "The methods" table (`summary/methods.parquet`): the success rate over all
# pairs, the L-inf quantiles and the mean L2 over the fooled pairs that **had to move** (the
# model did not already say the target: `had_to_move`, i.e. `pred != target`). DuckDB reads
# the pyarrow dataset in place, only the columns the query names.

# %%
methods = duckdb.sql("""
    SELECT origin, method, count(*) AS pairs, avg(success::INT) AS success_rate,
           quantile_cont(linf::DOUBLE, 0.5) FILTER (WHERE success AND had_to_move) AS median_linf,
           quantile_cont(linf::DOUBLE, 0.9) FILTER (WHERE success AND had_to_move) AS q90_linf,
           avg(l2) FILTER (WHERE success AND had_to_move) AS mean_l2
    FROM pairs GROUP BY ALL ORDER BY origin DESC, method""").df()
print(methods.to_string(index=False))

# %% [markdown]
# ## The headline
#
# The L-inf change (levels out of 255) that fools the median validation pair that had to move,
# and nine in ten of them, by the headline method; a pair never fooled counts as beyond every
# budget (numpy's linear quantile, as the summary's). The report's first paragraph says the same.

# %%
val = pairs.to_table(columns=["linf", "success", "had_to_move"],
                     filter=(ds.field("method") == method) & (ds.field("origin") == "val")
                     ).to_pandas()
moved = val[val.had_to_move]
fooled = np.sort(moved.linf[moved.success].to_numpy(np.float64))


def quantile(q: float) -> float | None:
    """The q quantile of the moved pairs' L-inf, the unfooled last (None: it falls on one)."""
    pos = q * (len(moved) - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    return None if hi >= len(fooled) else fooled[lo] + (fooled[hi] - fooled[lo]) * (pos - lo)


half, most = (quantile(q) for q in (0.5, 0.9))
print(f"headline ({method}): median L-inf {half and round(half, 3)}, 90% {most and round(most, 3)}"
      f", over {len(moved):,} of {len(val):,} validation pairs that had to move")

# %% [markdown]
# ## A gallery: the smallest changes
#
# The six fooled validation pairs of the headline method with the smallest L-inf change (one per
# image, the more confident first on a tie), with their class names; the fooling images come from
# the pairs, the originals from the ingest output the attack read (its manifest's `source`).

# %%
picks = duckdb.sql(f"""
    SELECT image_id, target, source_name, target_name, linf, p_target FROM pairs
    WHERE method = '{method}' AND origin = 'val' AND success AND had_to_move
    QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY linf, p_target DESC) = 1
    ORDER BY linf, p_target DESC, image_id LIMIT 6""").df()
ids = picks.image_id.tolist()
fooling = pairs.to_table(columns=["image_id", "target", "image"], filter=(
    ds.field("method") == method) & ds.field("target").isin(picks.target.tolist())
    & ds.field("image_id").isin(ids)).to_pandas().set_index(["image_id", "target"]).image
data_fs, data = open_uri(manifest["source"]["data"])
originals = ds.dataset(f"{data}/val", filesystem=data_fs, format="parquet").to_table(
    columns=["image_id", "image"], filter=ds.field("image_id").isin(ids)).to_pandas()
originals = originals.set_index("image_id").image
shape = manifest["image_shape"]

rows = max(1, (len(picks) + 1) // 2)  # two pairs a row, each original | fooling image
fig, axes = plt.subplots(rows, 4, figsize=(8, 2.4 * rows), squeeze=False)
for ax in axes.flat:
    ax.axis("off")
for k, p in enumerate(picks.itertuples()):
    print(f"{p.image_id}: {p.source_name} -> {p.target_name}, L-inf {p.linf:g}, "
          f"p {p.p_target:.2f}")
    row, col = divmod(2 * k, 4)
    for ax, raw, title in (
            (axes[row, col], originals[p.image_id], f"{p.source_name.split(',')[0]}\n(original)"),
            (axes[row, col + 1], fooling[(p.image_id, p.target)],
             f"{p.target_name.split(',')[0]}\nL-inf {p.linf:g}, p {p.p_target:.2f}")):
        ax.imshow(np.frombuffer(raw, np.uint8).reshape(shape), interpolation="nearest")
        ax.set_title(title, fontsize=8)
fig.suptitle(f"{method}: the smallest changes, original | fooling image", fontsize=9)
fig.tight_layout()
if PNG:
    fig.savefig(PNG, dpi=120)
    print(f"gallery: {PNG}")
else:
    plt.show()
