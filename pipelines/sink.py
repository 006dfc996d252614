"""The ingest job's Ray Data sink: write tasks that each write one Parquet file of a split.

Ray lives here and in pipelines/decoded.py's driver only; ``--help`` answers without importing it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from common import schema, storage
from pipelines import decoded


class ImagesDatasink(Datasink):
    """Writes one split: each write task gets about one file's worth of rows and writes one file.

    File names are deterministic per task (``part-<task>.parquet``), so a retried task rewrites its
    own file instead of adding a second. What comes back to the driver is small: the file's name,
    rows and bytes, the pixel sums, and the quarantine rows of the task's inputs.
    """

    def __init__(self, output: str, split: str, rows_per_file: int, size: int):
        self.output, self.split, self.rows_per_file = output, split, rows_per_file
        self.schema = schema.with_image_shape(schema.IMAGES_SCHEMA, (size, size, 3))

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        table = pa.concat_tables(tables) if tables else decoded.DECODED_SCHEMA.empty_table()
        bad = pc.is_valid(table.column(schema.REASON))
        good = table.filter(pc.invert(bad)) if pc.any(bad).as_py() else table
        sums = [pc.list_flatten(good.column(c)).to_numpy().reshape(-1, 3).sum(0).tolist()
                for c in (decoded.PX_SUM, decoded.PX_SUMSQ)]
        good = good.select(self.schema.names).cast(self.schema)
        result = {
            "file": None, "rows": good.num_rows, "bytes": 0, "sum": sums[0], "sumsq": sums[1],
            "decode_start": pc.min(table.column(decoded.DECODE_START)).as_py(),
            "decode_end": pc.max(table.column(decoded.DECODE_END)).as_py(),
            "decode_cpu_s": pc.sum(table.column(decoded.DECODE_CPU)).as_py() or 0.0,
            "quarantine": [
                {schema.SOURCE: r[schema.SOURCE], schema.SPLIT: self.split,
                 schema.REASON: r[schema.REASON]}
                for r in table.filter(bad).select([schema.SOURCE, schema.REASON]).to_pylist()
            ],
        }
        if good.num_rows:
            rel = f"{self.split}/part-{ctx.task_idx:05d}.parquet"
            fs, path = storage.filesystem(storage.join(self.output, rel))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            # no dictionary and no min/max statistics for the image bytes: neither can help a
            # reader, and they cost the writer 40% of its time (snappy stays: 1% smaller files).
            # A CRC-32 per page, which every reader checks (common/dataset.py): under 1% of the
            # decode's time (benchmarks/verify.py)
            small = [n for n in good.column_names if n != schema.IMAGE]
            with storage.naming(storage.join(self.output, rel)):  # a full disk names the file
                pq.write_table(good, path, filesystem=fs, row_group_size=decoded.ROW_GROUP_ROWS,
                               use_dictionary=small, write_statistics=small,
                               write_page_checksum=True)
            result.update(file=rel, bytes=fs.get_file_info(path).size)
        return result

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)
