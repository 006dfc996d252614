"""Damaged artifacts by the hundred: each reader returns exactly what it returns for the undamaged
artifact, or refuses in one line (ConfigError); never another exception, never changed data.

One test per artifact: the ingest manifest and one of its Parquet files, the model's
weights.npz, the attack's manifest, one of its pairs files and its summary tables, and a job's
identity record, each written by its real writer (no Ray). JSON is parsed, changed (a key
deleted, a value's type changed, NaN) and written again, or cut short (the identity record also
has bits flipped); binary files are cut short or have a byte changed. Seeded (FUZZ_SEED,
FUZZ_CASES): a failure names its case, and the same seed gives the same cases.

What "exactly" compares is what the reader gives its callers (each test's ``read``). A key the
contract lets a writer leave out, or set to null, may be: the reader then returns what the file
says. A JSON value changed within its type (a digit) is not among the cases: no checksum covers
a manifest, so no reader could tell.

Parquet files read in part (the ingest's, the pairs) carry a CRC-32 per page; their footer,
which no page checksum covers, is checked against the manifest and the contract (rows, columns,
types). What that leaves: a footer whose offset points a column at another column's page, which
has a valid CRC. Measured over 24,000 cases of each of these small files (whose footer is over
half their bytes; a big file's is a small part): 3 pairs cases, no ingest case. The seed here
meets none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from attacks.pairs import Pairs, open_attack, pair_file
from attacks.summary import describe, read_summary
from common import dataset, lifecycle, model, schema, storage
from common.errors import ConfigError
from tests.test_dataset import CLASSES, write_ingest
from tests.test_pairs import write_attack

SEED = int(os.environ.get("FUZZ_SEED", 20_240_611))
CASES = int(os.environ.get("FUZZ_CASES", 300))  # per artifact
REFUSED = "refused"


# --- the mutations --------------------------------------------------------------------------


def _pick(rng, obj) -> tuple[list, object]:
    """A random (path, value) inside obj: the path a list of keys and indices from the root."""
    path, here = [], obj
    while True:
        keys = list(here) if isinstance(here, dict) else list(range(len(here)))
        key = keys[rng.integers(len(keys))]
        value = here[key]
        path.append(key)
        if not (isinstance(value, dict | list) and value and rng.random() < 0.6):
            return path, value
        here = value


def _json_type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "null")


def _retyped(rng, value):
    """A value of another JSON type, NaN, or the same value in another type (3 -> 3.0, "3")."""
    choices = [c for c in (None, True, -1, 2.5, "x", [], {}, [value])
               if _json_type(c) != _json_type(value)] + [float("nan")]
    if isinstance(value, int | float) and not isinstance(value, bool):
        choices += [str(value)] + ([float(value)] if isinstance(value, int) else [])
    return choices[rng.integers(len(choices))]


def json_cases(obj: dict, rng, n: int, flips: bool = False):
    """(what was done, the file's bytes, the changed object or None when not JSON) n times."""
    text = json.dumps(obj, indent=2).encode()
    kinds = ["delete", "retype", "truncate"] + (["flip"] if flips else [])
    for _ in range(n):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "truncate":
            at = int(rng.integers(len(text)))
            yield f"cut at {at}", text[:at], None
        elif kind == "flip":
            data, at = bytearray(text), int(rng.integers(len(text)))
            data[at] ^= 1 << int(rng.integers(8))
            yield f"bit flipped at {at}", bytes(data), None
        else:
            changed = json.loads(text)
            while True:  # a key of an object to delete, any value to retype
                path, value = _pick(rng, changed)
                parent = changed
                for key in path[:-1]:
                    parent = parent[key]
                if kind == "retype" or isinstance(parent, dict):
                    break
            if kind == "delete":
                del parent[path[-1]]
                what = f"deleted {path}"
            else:
                parent[path[-1]] = _retyped(rng, value)
                what = f"{path}: {value!r:.30} -> {parent[path[-1]]!r}"
            yield what, json.dumps(changed, indent=2).encode(), (kind, path, changed)


def binary_cases(data: bytes, rng, n: int):
    """(what was done, the file's bytes) n times: cut short, a bit flipped, a byte changed."""
    for _ in range(n):
        kind, at = int(rng.integers(4)), int(rng.integers(len(data)))
        if kind == 0:
            yield f"cut at {at}", data[:at]
        else:
            out = bytearray(data)
            out[at] ^= 1 << int(rng.integers(8)) if kind < 3 else int(rng.integers(1, 256))
            yield f"byte {at}: {data[at]} -> {out[at]}", bytes(out)


def outcome(read, case: str):
    """The reader's result, or REFUSED for one ConfigError of one line; anything else fails."""
    try:
        return read()
    except ConfigError as e:
        assert "\n" not in str(e) and str(e), f"{case}: {e!r}"
        return REFUSED
    except Exception as e:  # noqa: BLE001 - the point: nothing but ConfigError
        pytest.fail(f"{case}: {type(e).__name__}: {e}")


def fuzz(path: str, cases, read, allowed=lambda changed, got: False) -> dict[str, int]:
    """Write each case's bytes at ``path``, read, put the original back. ``allowed`` says whether
    a result other than the original's is what the changed file legitimately says."""
    original = open(path, "rb").read()
    want = read()
    tally = {"refused": 0, "same": 0, "allowed": 0}
    try:
        for i, (what, data, *changed) in enumerate(cases):
            with open(path, "wb") as f:
                f.write(data)
            got = outcome(read, f"case {i}, {what}")
            if got is REFUSED:
                tally["refused"] += 1
            elif got == want:
                tally["same"] += 1
            elif changed and changed[0] is not None and allowed(changed[0], got):
                tally["allowed"] += 1
            else:
                pytest.fail(f"case {i}, {what}: read {got!r:.300}, not {want!r:.300}")
    finally:
        with open(path, "wb") as f:
            f.write(original)
    print(f"{os.path.basename(path)}: {sum(tally.values())} cases, {tally}")
    return tally


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz"))


# --- the tests -------------------------------------------------------------------------------

# what the contract lets an ingest manifest leave out, and what may be null
INGEST_OPTIONAL = {schema.M_CLASS_NAMES, schema.M_PIXEL_MEAN, schema.M_PIXEL_STD, "seen",
                   "quarantined", "bytes"}
INGEST_NULLABLE = {schema.M_CLASS_NAMES, schema.M_PIXEL_MEAN, schema.M_PIXEL_STD}


def ingest_view(data: str, m: dict) -> str:
    """What open_ingest's callers read of the manifest, through its functions; as JSON text, so
    that 3, 3.0 and true differ."""
    return json.dumps({
        "classes": m[schema.M_CLASSES], "names": m.get(schema.M_CLASS_NAMES),
        "D": dataset.num_features(m), "shape": m[schema.M_IMAGE_SHAPE],
        "counts": m[schema.M_COUNTS], "mean": m.get(schema.M_PIXEL_MEAN),
        "std": m.get(schema.M_PIXEL_STD),
        **{s: [dataset.split_files(data, m, s), dataset.split_counts(m, s)]
           for s in schema.SPLITS}}, sort_keys=True)


def test_ingest_manifest(outputs_dir):
    data = os.path.join(outputs_dir, "ingest")
    write_ingest(data)

    def read():
        return ingest_view(data, dataset.open_ingest(data, splits=schema.SPLITS))

    def allowed(changed, got) -> bool:
        kind, path, obj = changed
        valid = (kind == "delete" and path[-1] in INGEST_OPTIONAL) or (
            len(path) == 1 and path[0] in INGEST_NULLABLE and obj[path[0]] is None)
        return valid and got == outcome(lambda: ingest_view(data, obj), "the changed manifest")

    rng = np.random.default_rng(SEED)
    tally = fuzz(os.path.join(data, storage.MANIFEST),
                 json_cases(storage.read_manifest(data), rng, CASES), read, allowed)
    assert tally["refused"] > CASES / 3, tally


def test_ingest_split_file(outputs_dir):
    """A validation file of the ingest, as the attack reads it (open_ingest, then read_rows):
    its pages carry CRC-32s, its footer is checked against the manifest and the contract."""
    data = os.path.join(outputs_dir, "ingest-files")
    write_ingest(data)
    m = dataset.open_ingest(data)
    files, counts = dataset.split_files(data, m, "val"), dataset.split_counts(m, "val")

    def read():
        dataset.open_ingest(data, splits=schema.SPLITS)
        return [table_text(t) for t in dataset.read_rows(files, counts, 0, sum(counts), 4,
                                                         dataset.num_features(m))]

    rng = np.random.default_rng(SEED + 5)
    tally = fuzz(files[0], binary_cases(open(files[0], "rb").read(), rng, CASES), read)
    assert tally["refused"] > CASES / 2, tally


def test_pairs_file(outputs_dir):
    """A pairs file through each of Pairs' reads: pages with CRC-32s, the size, rows and
    columns checked against the listing and the contract."""
    out = os.path.join(outputs_dir, "pairs")
    write_attack(out)
    cols = schema.PAIRS_FILE_SCHEMA.names

    def read():
        pairs = Pairs.open(out)
        return (table_text(pairs.read("sign", 3, cols)), repr(pairs.take("sign", 3, ["b", "d"])),
                [table_text(pa.Table.from_batches([b]))
                 for b in pairs.batches([*cols, schema.METHOD, schema.TARGET], 2)])

    path = os.path.join(out, pair_file("sign", 3, "val-00000"))
    rng = np.random.default_rng(SEED + 6)
    tally = fuzz(path, binary_cases(open(path, "rb").read(), rng, CASES), read)
    assert tally["refused"] > CASES / 2, tally


def test_model(outputs_dir):
    """weights.npz with the sha256 its manifest records (every change refused), and without
    (the zip's CRC-32 of each array, np.load's own checks): the arrays are the original's."""
    rng = np.random.default_rng(SEED + 1)
    W = rng.normal(0, 1e-2, (len(CLASSES), 48)).astype(np.float32)
    b = rng.normal(0, 1e-2, len(CLASSES)).astype(np.float32)
    def reader(out: str):
        def read():
            m = model.read_model(out, D=48)
            return m.W.tobytes(), m.b.tobytes(), m.classes, m.D
        return read

    tallies = []
    for name, listed in (("model", True), ("model-no-digest", False)):
        out = os.path.join(outputs_dir, name)
        entry = model.write_weights(out, W, b, CLASSES)
        storage.write_manifest(out, {schema.M_KIND: "train",
                                     **({schema.M_FILES: [entry]} if listed else {})})
        path = os.path.join(out, schema.WEIGHTS_FILE)
        tallies.append(fuzz(path, binary_cases(open(path, "rb").read(), rng, CASES // 2),
                            reader(out)))
    assert tallies[0]["refused"] == CASES // 2, tallies  # the digest: every change is refused
    out = os.path.join(outputs_dir, "model")
    tally = fuzz(os.path.join(out, storage.MANIFEST),
                 json_cases(storage.read_manifest(out), rng, CASES // 4), reader(out))
    assert tally["same"] > 0 and tally["refused"] > 0, tally


def table_text(table: pa.Table) -> str:
    """A table's columns, their types and values as text: equal for equal tables, NaN included.
    Not the footer's key-value metadata (the image column's shape, for analysts reading a file
    alone): no reader here uses it, and no checksum covers it."""
    fields = [f.remove_metadata() for f in table.schema]
    return f"{pa.schema(fields)}\n{json.dumps(table.to_pydict(), default=bytes.hex)}"


ATTACK_READ = (schema.M_CLASSES, schema.M_CLASS_NAMES, schema.M_IMAGE_SHAPE, schema.M_SOURCE,
               schema.M_COUNTS)


def attack_view(out: str) -> tuple:
    """What the readers of an attack output get: the keys open_attack checks, the pairs' files,
    the summary tables and attacks.summary's description."""
    m = open_attack(out)
    tables = read_summary(out, m)
    return (json.dumps({k: m.get(k) for k in ATTACK_READ}, sort_keys=True),
            {name: dataclasses.astuple(f) for listed in Pairs.open(out, m).files.values()
             for name, f in ((f.path, f) for f in listed)},
            {name: table_text(t) for name, t in tables.items()}, describe(out))


def test_attack_manifest(outputs_dir):
    out = os.path.join(outputs_dir, "attack")
    write_attack(out)
    original = attack_view(out)

    def allowed(changed, got) -> bool:  # a top-level key no reader here needs, left out
        kind, path, obj = changed
        return (kind == "delete" and len(path) == 1 and path[0] in ATTACK_READ
                and got[1:] == original[1:]
                and json.loads(got[0]) == {k: obj.get(k) for k in ATTACK_READ})

    rng = np.random.default_rng(SEED + 2)
    tally = fuzz(os.path.join(out, storage.MANIFEST),
                 json_cases(storage.read_manifest(out), rng, CASES), lambda: attack_view(out),
                 allowed)
    assert tally["refused"] > CASES / 3, tally


def test_summary_tables(outputs_dir):
    """Each table is read whole and checked against its size and sha256 in the manifest."""
    out = os.path.join(outputs_dir, "summary")
    write_attack(out)
    rng = np.random.default_rng(SEED + 3)

    def read():
        return {name: table_text(t) for name, t in read_summary(out).items()}

    for file in schema.SUMMARY_TABLES.values():
        path = os.path.join(out, schema.SUMMARY_DIR, file)
        n = CASES // len(schema.SUMMARY_TABLES)
        tally = fuzz(path, binary_cases(open(path, "rb").read(), rng, n), read)
        assert tally["refused"] == n, (file, tally)


def test_identity_record(outputs_dir):
    """A rerun resumes only when the record it finds is its own, byte for byte in meaning."""
    uri = os.path.join(outputs_dir, "identity")
    job = lifecycle.Output(uri, "attack", owns=("pairs", "summary"), inputs={"data": "/in/data"},
                           identity={"inputs": {"data": {"uri": "/in/data",
                                                         "manifest_sha256": "cd" * 32}},
                                     "settings": {"methods": ["sign", "exact"], "seed": 0,
                                                  "confidence": 0.5, "targets": "all"}})
    record = job.record()
    storage.write_json_atomic(os.path.join(uri, lifecycle.IDENTITY_FILE), record)
    rng = np.random.default_rng(SEED + 4)
    tally = fuzz(os.path.join(uri, lifecycle.IDENTITY_FILE),
                 json_cases(record, rng, CASES, flips=True), lambda: job.check(overwrite=False))
    assert tally["refused"] > CASES * 0.9, tally


# --- the damage first reported, through the commands -------------------------------------------


@pytest.fixture()
def command_logging():
    """The root logger's handlers back as they were after a command (``cli.main`` points them
    at this test's captured stderr, which is closed once the test ends)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("what, damage, message", [
    ("data", lambda raw: raw[:len(raw) // 2], r"manifest.json: not JSON \(.* at line \d+"),
    ("data", lambda raw: b"[" + raw + b"]", r"manifest.json: an array, not a JSON object$"),
    ("data", lambda raw: json.dumps({k: v for k, v in json.loads(raw).items()
                                     if k != schema.M_FILES}).encode(),
     r"manifest.json: 'files' must list the output's files, got None$"),
    ("model", lambda raw: raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
     r"weights.npz: damaged: its sha256 is not the one its manifest records$"),
])
def test_damage_stops_the_attack_in_one_line(outputs_dir, capsys, command_logging, what, damage,
                                             message):
    """A manifest that is not JSON, a JSON array, an ingest manifest without its files, a
    weights.npz with one byte changed: ``attacks.fool`` exits 2 with one line naming the file,
    before any work (no output, no Ray)."""
    from attacks import fool

    data = os.path.join(outputs_dir, f"fool-data-{len(os.listdir(outputs_dir))}")
    write_ingest(data)
    model_dir = data + "-model"
    entry = model.write_weights(model_dir, np.zeros((len(CLASSES), 48), np.float32),
                                np.zeros(len(CLASSES), np.float32), CLASSES)
    storage.write_manifest(model_dir, {schema.M_KIND: "train", schema.M_FILES: [entry]})
    path = (os.path.join(data, storage.MANIFEST) if what == "data"
            else os.path.join(model_dir, schema.WEIGHTS_FILE))
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    out = data + "-fooling"
    capsys.readouterr()  # what writing the inputs logged
    with pytest.raises(SystemExit) as e:
        fool.main(["--data", data, "--model", model_dir, "--output", out])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert err.startswith(f"error: {path}: ") and re.search(message, err), err
    assert not os.path.exists(out)


def test_pairs_nan_in_the_manifest_is_refused_by_the_summary(outputs_dir, capsys,
                                                             command_logging):
    """``"pairs": NaN`` was printed as "nan pairs" with exit 0; a JSON that is not a number, or
    a count that is not an integer, is now one line and exit 2."""
    from attacks import summary

    out = os.path.join(outputs_dir, "nan-pairs")
    write_attack(out)
    capsys.readouterr()  # what writing it logged
    path = os.path.join(out, storage.MANIFEST)
    m = storage.read_manifest(out)
    for value, message in ((float("nan"), r"not JSON \(NaN is not a JSON number\)$"),
                           (10.0, r"'counts' must hold pairs, val_images, noise_images, targets "
                                  r"\(integers >= 0\)")):
        with open(path, "w") as f:
            json.dump({**m, schema.M_COUNTS: {**m[schema.M_COUNTS], "pairs": value}}, f)
        with pytest.raises(SystemExit) as e:
            summary.main(["--results", out])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith(f"error: {path}: "), err
        assert re.search(message, err), err
