"""Answers cached on disk by request hash, so re-running a judging or labelling job costs no model calls.

One JSON file per request under `<dir>/<first 2 hex>/<sha256>.json`: several processes can share a cache
(each write is a rename of a complete file, so a reader never sees half an answer) and nothing is unpickled.
A cached answer is returned as is, also for sampled (temperature > 0) requests: that is what asking for a
cache means; pass a different `seed` to get a fresh sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lmstack.client.base import Completion, GenParams
from lmstack.errors import LmstackError

_VERSION = 1  # bump when the key or the file format changes, so old entries are never misread


def request_key(api: str, model: str, prompt: Any, params: GenParams) -> str:
    """sha256 over the canonical JSON of what determines the answer: endpoint kind, model, input, params."""
    payload = {"v": _VERSION, "api": api, "model": model, "input": prompt, "params": params.to_dict()}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DiskCache:
    """A folder of cached `Completion`s keyed by `request_key`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            message = f"cannot create cache folder {self.folder}: {e}; pass another cache_dir"
            raise LmstackError(message) from None

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The cached answer, or None; an unreadable entry (e.g. edited by hand) counts as a miss."""
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
            return Completion.from_dict(record["completion"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, completion: Completion) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:8]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "completion": completion.to_dict()}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
