"""A job's small result table: ``<out>/<name>.parquet`` beside ``<name>.md``, read back checked:
each page against the CRC-32 written with it, each column against the row's field.

A table is a frozen dataclass of one row: its fields, in order and with their types, are the
Parquet columns (float -> double, int -> int64, str -> string, bool -> bool; only a field typed
``X | None`` may hold nulls). The sweep (common/sweep.py, ``SweepRow``), the frontier and the
transfer table (attacks/tables.py, ``FrontierRow`` and ``TransferRow``) are such tables.

    >>> files = write_table("out/frontier", "frontier", FrontierRow, rows, md)  # manifest entries
    >>> rows = read_table("out/frontier", "frontier", "frontier", FrontierRow)  # [FrontierRow]
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.errors import ConfigError

ARROW_TYPES = {float: pa.float64(), int: pa.int64(), str: pa.string(), bool: pa.bool_()}


def columns(row_type: type) -> list[tuple[str, pa.DataType, bool]]:
    """(name, Arrow type, may be null) of each field of the row dataclass, in order."""
    hints = typing.get_type_hints(row_type)
    out = []
    for f in dataclasses.fields(row_type):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hints[f.name]
        out.append((f.name, ARROW_TYPES[base], optional))
    return out


def arrow_schema(row_type: type) -> pa.Schema:
    """The Parquet file's schema: one column per field, every one nullable (as pyarrow infers)."""
    return pa.schema([(name, t) for name, t, _ in columns(row_type)])


def markdown(head: Sequence[str], align: str, cells) -> str:
    """A Markdown table: the header, each column's alignment (``l`` or ``r``), the rows' cells."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    rows = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(["| " + " | ".join(head) + " |", rule, *rows]) + "\n"


def write_table(out: str, name: str, row_type: type, rows: Sequence, md: str) -> list[dict]:
    """Write the rows (instances of ``row_type``) and their Markdown; returns the manifest's file
    entries."""
    cols = columns(row_type)
    if not all(isinstance(r, row_type) for r in rows):
        raise TypeError(f"{name}: every row must be a {row_type.__name__}")
    table = pa.Table.from_pydict({c: [getattr(r, c) for r in rows] for c, _, _ in cols},
                                 schema=arrow_schema(row_type))
    nulls = [c for c, _, optional in cols if not optional and table.column(c).null_count]
    if nulls:
        raise ValueError(f"{name}: None in the columns {', '.join(nulls)}")
    fs, path = storage.filesystem(storage.join(out, f"{name}.parquet"))
    pq.write_table(table, path, filesystem=fs, write_page_checksum=True)  # read_table checks it
    storage.write_bytes(storage.join(out, f"{name}.md"), md.encode())
    return [{"path": f"{name}.parquet", "rows": len(rows)}, {"path": f"{name}.md"}]


def read_table(out: str, kind: str, name: str, row_type: type) -> list:
    """The rows of a finished output of that kind, as ``row_type`` objects; an unfinished
    output or a file whose columns are not the row's is one ConfigError."""
    m = storage.read_manifest(out, f"{kind} output")
    if m.get("kind") != kind:
        raise ConfigError(f"{out} is not a {kind} output (kind: {m.get('kind')!r})")
    uri = storage.join(out, f"{name}.parquet")
    fs, path = storage.filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs, page_checksum_verification=True)
    except FileNotFoundError:
        raise ConfigError(f"{uri} is missing: the {kind} output is incomplete") from None
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:  # cut short, damaged, not Parquet
        reason = str(e).splitlines()[0].rsplit("': ", 1)[-1]  # the part after the path
        raise ConfigError(f"{uri}: not a readable Parquet file ({reason})") from None
    return rows_of(table, row_type, uri)


def rows_of(table: pa.Table, row_type: type, uri: str) -> list:
    """The table's rows as ``row_type`` objects, after checking each field's column (other
    columns are left out); every problem is named in one ConfigError."""
    problems, picked = [], {}
    for c, want, optional in columns(row_type):
        if c not in table.column_names:
            problems.append(f"no column {c}")
            continue
        col = table.column(c)
        if optional and col.type == pa.null():  # every value null: pyarrow infers no type
            col = col.cast(want)
        if col.type != want:
            problems.append(f"column {c} is {col.type}, not {want}")
        elif col.null_count and not optional:
            problems.append(f"column {c} has {col.null_count} nulls")
        picked[c] = col
    if problems:
        raise ConfigError(f"{uri}: {'; '.join(problems)}")
    return [row_type(**r) for r in pa.table(picked).to_pylist()]
