"""A job's small result table: ``<out>/<name>.parquet`` beside ``<name>.md``, read back checked.

The sweep (common/sweep.py), the frontier (attacks/frontier.py) and the transfer table
(attacks/transfer.py) are such tables; their names and columns live in common/schema.py.

    >>> files = write_table("out/frontier", "frontier", rows, schema.FRONTIER_COLUMNS, md)
    >>> table = read_table("out/frontier", "frontier", "frontier", schema.FRONTIER_COLUMNS)
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.errors import ConfigError


def write_table(out: str, name: str, rows: list[dict], columns: list[str], md: str) -> list[dict]:
    """Write the rows (only ``columns``, in that order) and their Markdown; returns the
    manifest's file entries."""
    fs, path = storage.filesystem(storage.join(out, f"{name}.parquet"))
    pq.write_table(pa.Table.from_pylist(rows).select(columns), path, filesystem=fs)
    storage.write_bytes(storage.join(out, f"{name}.md"), md.encode())
    return [{"path": f"{name}.parquet", "rows": len(rows)}, {"path": f"{name}.md"}]


def read_table(out: str, kind: str, name: str, columns: list[str]) -> pa.Table:
    """The table of a finished output of that kind, with every column of its contract; anything
    else is one ConfigError."""
    m = storage.read_manifest(out, f"{kind} output")
    if m.get("kind") != kind:
        raise ConfigError(f"{out} is not a {kind} output (kind: {m.get('kind')!r})")
    uri = storage.join(out, f"{name}.parquet")
    fs, path = storage.filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise ConfigError(f"{uri} is missing: the {kind} output is incomplete") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"{uri} lacks the columns {', '.join(missing)}")
    return table
