"""What a folder holds: to check that a job never touched its inputs, and to search its files."""

from __future__ import annotations

import hashlib
import os


def tree_digest(root) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes: equal before and after = untouched."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def every_file(top: str):
    """The paths of the regular files under top (links left out)."""
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path
