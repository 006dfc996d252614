"""The result tables (common/tables.py): a row dataclass's fields are its Parquet columns, written
and read back through the real files; a file that is not the row's is refused in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attacks import tables as attack_tables
from attacks.tables import FrontierRow, TransferRow
from common import schema, storage, sweep
from common.errors import ConfigError
from common.sweep import SweepRow
from common.tables import arrow_schema, columns, read_table, write_table

SWEEP = [SweepRow(reg=r, robust_eps=e, val_top1=0.5, val_top5=0.9, val_loss=1.2, train_loss=1.1,
                  train_top1=0.6, w_norm=2.0, w_pixels_norm=0.1, epochs=3, median_sign_eps=7.0,
                  model=f"/m/reg={r:g}") for r, e in ((1e-4, 0.0), (0.1, 8.0))]
FRONTIER = [FrontierRow(sweep="/s", reg=1e-4, robust_eps=e, val_top1=0.5, val_top5=0.9,
                        method="sign", median_linf=m, success_rate=0.75, pairs=16, model="/m",
                        attack="/a", median_l2=l2) for e, m, l2 in ((0.0, 3.0, 212.5),
                                                                    (8.0, None, None))]
TRANSFER = [TransferRow(source_model="/m/a", scoring_model=s, same_model=s == "/m/a",
                        method="sign", origin="val", pairs=16, target_rate=0.5, moved_rate=0.75,
                        median_p_target=0.25) for s in ("/m/a", "/m/b")]
# (kind, table name, row type, rows, writer, reader) of each table
TABLES = [("sweep", sweep.TABLE, SweepRow, SWEEP, sweep.write_sweep, sweep.read_sweep),
          ("frontier", schema.FRONTIER_TABLE, FrontierRow, FRONTIER,
           attack_tables.write_frontier, attack_tables.read_frontier),
          ("transfer", schema.TRANSFER_TABLE, TransferRow, TRANSFER,
           attack_tables.write_transfer, attack_tables.read_transfer)]
IDS = [t[0] for t in TABLES]


def written(tmp_path, kind, write, rows) -> str:
    out = str(tmp_path / kind)
    os.makedirs(out)
    files = write(out, rows)
    storage.write_manifest(out, {schema.M_KIND: kind, schema.M_FILES: files})
    return out


@pytest.mark.parametrize(("kind", "name", "row_type", "rows", "write", "read"), TABLES, ids=IDS)
def test_round_trip(tmp_path, kind, name, row_type, rows, write, read):
    out = written(tmp_path, kind, write, rows)
    assert read(out) == rows
    md = open(os.path.join(out, f"{name}.md")).read().splitlines()
    assert len(md) == 2 + len(rows)


@pytest.mark.parametrize(("kind", "name", "row_type", "rows", "write", "read"), TABLES, ids=IDS)
def test_the_fields_are_the_columns(tmp_path, kind, name, row_type, rows, write, read):
    out = written(tmp_path, kind, write, rows)
    file_schema = pq.read_schema(os.path.join(out, f"{name}.parquet"))
    assert file_schema.names == [f.name for f in dataclasses.fields(row_type)]
    assert file_schema.equals(arrow_schema(row_type))
    assert set(file_schema.types) <= {pa.float64(), pa.int64(), pa.string(), pa.bool_()}


def test_the_types_are_those_pyarrow_infers_from_the_values():
    """The files keep the columns that pyarrow inferred from dict rows before the dataclasses."""
    for row_type, rows in ((SweepRow, SWEEP), (FrontierRow, FRONTIER[:1]),
                           (TransferRow, TRANSFER)):
        inferred = pa.Table.from_pylist([dataclasses.asdict(r) for r in rows]).schema
        assert inferred.equals(arrow_schema(row_type))


def test_the_columns_shared_with_the_summary_have_its_names():
    frontier = {f.name for f in dataclasses.fields(FrontierRow)}
    transfer = {f.name for f in dataclasses.fields(TransferRow)}
    assert {schema.METHOD, schema.S_PAIRS, schema.S_SUCCESS_RATE} <= frontier
    assert {schema.METHOD, schema.ORIGIN, schema.S_PAIRS} <= transfer


def names(row_type: type, arrow_type: pa.DataType, optional: bool = False) -> list[str]:
    """The row's columns of that type (and that may, or may not, be null)."""
    return [c for c, t, opt in columns(row_type) if t == arrow_type and opt == optional]


@pytest.mark.parametrize(("kind", "name", "row_type", "rows", "write", "read"), TABLES, ids=IDS)
def test_a_missing_or_mistyped_column_is_one_line_naming_the_file(
        tmp_path, kind, name, row_type, rows, write, read):
    out = written(tmp_path, kind, write, rows)
    path = os.path.join(out, f"{name}.parquet")
    table = pq.read_table(path)
    first, last = table.column_names[0], table.column_names[-1]
    pq.write_table(table.drop_columns([first]), path)
    with pytest.raises(ConfigError) as e:
        read(out)
    assert str(e.value) == f"{path}: no column {first}"
    pq.write_table(table.set_column(len(table.columns) - 1, last,
                                    pa.array([1] * len(table), pa.int32())), path)
    with pytest.raises(ConfigError) as e:
        read(out)
    assert str(e.value) == f"{path}: column {last} is int32, not {table.schema.field(last).type}"


def test_every_problem_in_one_line_and_other_columns_ignored(tmp_path):
    out = written(tmp_path, "sweep", sweep.write_sweep, SWEEP)
    path = os.path.join(out, f"{sweep.TABLE}.parquet")
    good = pq.read_table(path)
    number, count = names(SweepRow, pa.float64())[0], names(SweepRow, pa.int64())[0]
    bad = good.set_column(good.schema.get_field_index(number), number, pa.array(["a", "b"]))
    pq.write_table(bad.drop_columns([count]), path)
    with pytest.raises(ConfigError) as e:
        sweep.read_sweep(out)
    assert str(e.value) == f"{path}: column {number} is string, not double; no column {count}"
    pq.write_table(good.append_column("extra", pa.array(["x", "y"])), path)
    assert sweep.read_sweep(out) == SWEEP  # a column that is no field is left out


def test_nulls_only_where_the_field_may_be_none(tmp_path):
    out = written(tmp_path, "frontier", attack_tables.write_frontier, FRONTIER)
    path = os.path.join(out, f"{schema.FRONTIER_TABLE}.parquet")
    table = pq.read_table(path)
    optional = names(FrontierRow, pa.float64(), optional=True)
    assert optional == ["median_linf", "median_l2"]
    for maybe in optional:
        # every value null: pyarrow infers the null type for dict rows; read back as None
        pq.write_table(table.set_column(table.schema.get_field_index(maybe), maybe,
                                        pa.nulls(len(table))), path)
        assert [getattr(r, maybe) for r in attack_tables.read_frontier(out)] == [None, None]
    never = names(FrontierRow, pa.float64())[0]
    pq.write_table(table.set_column(table.schema.get_field_index(never), never,
                                    pa.array([0.5, None], pa.float64())), path)
    with pytest.raises(ConfigError, match=rf"{path}: column {never} has 1 nulls$"):
        attack_tables.read_frontier(out)
    with pytest.raises(ValueError, match=f"None in the columns {never}"):
        write_table(out, schema.FRONTIER_TABLE, FrontierRow,
                    [dataclasses.replace(FRONTIER[0], **{never: None})], "")


def test_refused_without_a_manifest_of_its_kind_or_its_file(tmp_path):
    out = written(tmp_path, "transfer", attack_tables.write_transfer, TRANSFER)
    with pytest.raises(ConfigError, match="is not a frontier output"):
        read_table(out, "frontier", schema.TRANSFER_TABLE, TransferRow)
    os.remove(os.path.join(out, f"{schema.TRANSFER_TABLE}.parquet"))
    with pytest.raises(ConfigError, match="transfer.parquet is missing"):
        attack_tables.read_transfer(out)
    with open(os.path.join(out, f"{schema.TRANSFER_TABLE}.parquet"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        attack_tables.read_transfer(out)
    os.remove(os.path.join(out, storage.MANIFEST))
    with pytest.raises(ConfigError, match="no manifest.json"):
        attack_tables.read_transfer(out)


def test_rows_of_another_type_are_not_written(tmp_path):
    with pytest.raises(TypeError, match="every row must be a SweepRow"):
        write_table(str(tmp_path), "sweep", SweepRow, [dataclasses.asdict(SWEEP[0])], "")


def test_empty_tables_keep_their_columns(tmp_path):
    out = written(tmp_path, "transfer", attack_tables.write_transfer, [])
    assert attack_tables.read_transfer(out) == []
    file_schema = pq.read_schema(os.path.join(out, f"{schema.TRANSFER_TABLE}.parquet"))
    assert file_schema.equals(arrow_schema(TransferRow))


def test_a_bad_sweep_table_stops_the_frontier_job_with_one_line(tmp_path):
    """Through the command line: exit 2, ``error: <file>: <what>``, no traceback."""
    out = str(tmp_path / "sweep")
    os.makedirs(out)
    sweep.write_sweep(out, SWEEP)
    storage.write_manifest(out, {schema.M_KIND: "sweep", schema.M_DATA: str(tmp_path / "data")})
    path = os.path.join(out, f"{sweep.TABLE}.parquet")
    table = pq.read_table(path)
    number = names(SweepRow, pa.float64())[-1]
    pq.write_table(table.set_column(table.schema.get_field_index(number), number,
                                    pa.array(["half", "half"])), path)
    r = subprocess.run([sys.executable, "-m", "attacks.frontier", "--sweeps", out,
                        "--output", str(tmp_path / "frontier")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {path}: column {number} is string, not double"
    assert not (tmp_path / "frontier").exists()


def test_a_frontier_table_from_before_median_l2_reads_it_as_none(tmp_path):
    """The groups of columns added since the first tables: one missing whole reads as its
    defaults (older tables: series and round too, tests/test_harden.py), part of one is refused."""
    out = written(tmp_path, "frontier", attack_tables.write_frontier, FRONTIER)
    path = os.path.join(out, f"{schema.FRONTIER_TABLE}.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["median_l2"]), path)
    assert attack_tables.read_frontier(out) == [dataclasses.replace(r, median_l2=None)
                                                for r in FRONTIER]
    pq.write_table(table.drop_columns(["series", "round", "median_l2"]), path)
    assert [r.median_l2 for r in attack_tables.read_frontier(out)] == [None, None]
    pq.write_table(table.drop_columns(["round", "median_l2"]), path)
    with pytest.raises(ConfigError, match="no column round"):
        attack_tables.read_frontier(out)
    assert "| 212.5 |" in attack_tables.frontier_markdown(FRONTIER)
