"""The benchmark cache: its location, content digests, and folders written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$PACTMERGE_CACHE``, else ``~/.cache/pactmerge/bench``."""
    env = os.environ.get("PACTMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pactmerge" / "bench"


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def file_sha(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_atomic(dest: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder into a temporary sibling and rename it into place when complete; an existing
    ``dest`` is returned as is."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not dest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
