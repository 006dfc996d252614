"""The output lifecycle every job follows (docs/design.md, "The output lifecycle").

    >>> out = Output("out/model", kind="train", owns=("weights.npz", "checkpoints"),
    ...              inputs={"data": "out/imagenet64"}, settings={"reg": 0.1, ...})
    >>> resuming = out.prepare(overwrite=False)      # refuses, clears, or resumes; before any work
    >>> ...                                          # the job writes its files
    >>> out.finish(manifest)                         # checks and writes manifest.json, last

The rules, each enforced here and nowhere else:
- An output equal to, inside, or containing any input of the job is refused before anything is
  written (``--overwrite`` included).
- One run at a time writes an output: before its identity record, a run claims the output
  (``_lease.json``, common/lease.py: created only if absent, renewed while the run lives, released
  by ``finish`` or at exit). A run that finds another live run's claim is refused with one line
  naming that run's host, pid and start; a claim left by a killed run lapses after
  ``FOOLING_LEASE_S`` seconds (60) and is then taken over. A run whose claim was taken from it
  writes no manifest.
- An output is this job's own only when it carries the job's identity record (``_identity.json``:
  job kind, the identity of its inputs, the settings that define the result), written before any
  data. ``--overwrite`` removes only the names that both the record lists in ``owns`` and the job
  itself writes (the record is not trusted for others: they stay, named in one log line), never
  other files; anything a job would write that is found without a record (stale ``pairs/``,
  checkpoints, another job's manifest) is refused with one line naming what was found.
- A rerun resumes only when the record is the same; with other settings or inputs it is refused.
- The manifest is written last, after its numbers are checked to be finite; it carries the identity
  and every path in it is an absolute URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from common import lease, schema, storage
from common.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY_FILE = "_identity.json"
LEASE_FILE = lease.LEASE_FILE
OWN_NAMES = (storage.MANIFEST, IDENTITY_FILE, LEASE_FILE)  # the lifecycle's, never a job's


def absolute(uri: str) -> str:
    """The URI as an absolute one: a local path made absolute (symlinks resolved), s3:// as is."""
    if storage.is_s3(uri):
        return "s3://" + uri[len("s3://"):].strip("/")
    return os.path.realpath(os.path.abspath(uri))


def _key(uri: str) -> str:
    """A comparable form: scheme and absolute path, no trailing slash."""
    uri = absolute(uri)
    return uri if storage.is_s3(uri) else "file://" + uri.rstrip("/")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def refuse_overlap(output: str, inputs: Mapping[str, str | None]) -> None:
    """Refuse an output equal to, inside, or containing one of the job's inputs."""
    out = _key(output)
    for name, uri in inputs.items():
        if not uri:
            continue
        src = _key(uri)
        if _within(out, src) or _within(src, out):
            where = ("is" if out == src else "is inside" if _within(out, src) else "contains")
            raise ConfigError(f"the output {output} {where} the {name} {uri}: choose an output "
                              "apart from the job's inputs")


def input_identity(uri: str) -> dict:
    """What identifies a finished input: its absolute URI and the sha256 of its manifest."""
    data = storage.read_bytes(storage.join(uri, storage.MANIFEST))
    return {"uri": absolute(uri), "manifest_sha256": hashlib.sha256(data).hexdigest()}


def check_finite(obj, where: str = "manifest") -> None:
    """Raise ValueError naming the first key whose number is NaN or infinite."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: a non-finite number is never published")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")


def _flat(record: Mapping, prefix: str = "") -> dict:
    """{"settings": {"reg": 1}} -> {"reg": 1}; inputs keep their prefix ("inputs.data.uri")."""
    out = {}
    for k, v in record.items():
        name = k if prefix in ("", "settings.") else f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[name] = v
    return out


@dataclass(frozen=True)
class Output:
    """One job's output folder and the rules for it.

    ``owns``: the top-level names the job writes there (files or folders) besides the manifest,
    its identity record and its claim (OWN_NAMES): what ``--overwrite`` may remove. ``inputs``:
    name -> URI of everything the job reads (refused as outputs). ``identity``: input identities
    and defining settings. ``claim``: this run's claim on the output (taken by ``prepare``).
    """

    uri: str
    kind: str
    owns: tuple[str, ...]
    inputs: Mapping[str, str | None] = field(default_factory=dict)
    identity: Mapping = field(default_factory=dict)
    claim: lease.Lease = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if set(self.owns) & set(OWN_NAMES):
            raise ValueError(f"owns={self.owns} names the lifecycle's own files {OWN_NAMES}")
        object.__setattr__(self, "claim", lease.Lease(self.uri))  # frozen: set once, here

    def record(self) -> dict:
        """The identity record, as JSON reads it back (lists, not tuples)."""
        return json.loads(json.dumps({"kind": self.kind, **self.identity,
                                      "owns": sorted(self.owns)}))

    def _found(self) -> list[str]:
        """Which of the names a job of this kind writes already exist under the output."""
        names = [storage.MANIFEST, IDENTITY_FILE, *self.owns]
        return [n for n in names if storage.exists(storage.join(self.uri, n))]

    def _read(self, name: str) -> dict | None:
        uri = storage.join(self.uri, name)
        try:
            return storage.read_json(uri)
        except FileNotFoundError:
            return None
        except ConfigError:
            raise  # not JSON, or not an object: one line naming the file already
        except OSError as e:
            raise ConfigError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None

    def check(self, overwrite: bool, resumable: bool = True) -> bool:
        """Refuse an output this run must not write to; reads only. Returns True when an
        unfinished run with the same identity would be resumed (only for jobs that can:
        ``resumable``; for the others it is cleared and started again)."""
        refuse_overlap(self.uri, self.inputs)
        self.claim.refuse_other()  # what is found there is another live run's, not to judge
        found = self._found()
        ours = self._read(IDENTITY_FILE) if IDENTITY_FILE in found else None
        manifest = self._read(storage.MANIFEST) if storage.MANIFEST in found else None
        kind = (manifest or ours or {}).get("kind")
        if found and kind is not None and kind != self.kind:
            raise ConfigError(f"{self.uri} holds a {kind} output ({', '.join(found)}): choose "
                              f"another output; --overwrite replaces only a {self.kind} output")
        if found and ours is None:
            raise ConfigError(f"{self.uri} holds {', '.join(found)} without {IDENTITY_FILE}: "
                              "not written by this job; choose another output or remove them")
        if manifest is not None and not overwrite:
            raise ConfigError(f"{self.uri} already holds a finished {self.kind} output; pass "
                              "--overwrite to replace it")
        if ours is None or manifest is not None or overwrite:
            return False
        if ours != self.record():
            before, now = _flat(ours), _flat(self.record())
            changed = ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}"
                                for k in sorted({*before, *now}) if before.get(k) != now.get(k))
            raise ConfigError(f"{self.uri} holds an unfinished {self.kind} run with other "
                              f"settings or inputs ({changed}); rerun with the same to resume "
                              "it, or pass --overwrite to start again")
        return resumable

    def prepare(self, overwrite: bool, resumable: bool = True,
                ready: Callable[[], None] | None = None) -> bool:
        """``check`` and a probe that the output is writable, then claim the output (refused
        while another run holds it), then ``ready`` (the job's checks that need Ray: a refusal
        there releases the claim and leaves no file), then ``check`` again under the claim, clear
        the output for a new run and record its identity, before any data is written. Returns
        True when resuming (nothing is cleared then). The claim is held until ``finish``."""
        self.check(overwrite, resumable)
        storage.check_writable(self.uri)
        self.claim.acquire()
        try:
            if ready is not None:
                ready()
            resuming = self.check(overwrite, resumable)  # what a run before the claim left
            if resuming:
                log.info("%s holds an unfinished %s run with the same settings: resuming it",
                         self.uri, self.kind)
                return True
            previous = self._read(IDENTITY_FILE)
            if previous is not None:
                self._clear(previous.get("owns", []))
            storage.write_json_atomic(storage.join(self.uri, IDENTITY_FILE), self.record())
        except BaseException:
            self.claim.release()
            raise
        return False

    def _clear(self, written: list[str]) -> None:
        """Remove what the earlier run's record says it writes and this job writes too, the
        manifest first (no reader trusts a half-replaced output); nothing else under the output
        is touched, whatever the record lists."""
        if not isinstance(written, list):
            written = [written]
        unsafe = [n for n in written if not isinstance(n, str) or n in ("", ".", "..") or "/" in n]
        if unsafe:
            raise ConfigError(f"{self.uri}/{IDENTITY_FILE} lists {unsafe} as written: not names "
                              "inside the output; remove the output by hand")
        foreign = sorted(set(written) - set(self.owns))
        if foreign:
            log.warning("%s/%s also lists %s as written: not names a %s job writes, so they "
                        "stay", self.uri, IDENTITY_FILE, ", ".join(foreign), self.kind)
        storage.delete_file(storage.join(self.uri, storage.MANIFEST))
        for name in sorted(set(written) & set(self.owns)):
            uri = storage.join(self.uri, name)
            storage.delete_dir(uri)
            storage.delete_file(uri)
        storage.delete_file(storage.join(self.uri, IDENTITY_FILE))

    def finish(self, manifest: dict) -> dict:
        """Write ``manifest.json`` last, after checking every number in it is finite and that
        the claim on the output is still this run's; then release the claim."""
        manifest = {**manifest, schema.M_IDENTITY: self.record()}
        check_finite(manifest)
        self.claim.check()
        storage.write_manifest(self.uri, manifest)
        self.claim.release()
        return manifest

