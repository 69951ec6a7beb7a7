"""The audit log of security events: failed authentication, cross-tenant attempts, foreign
origins. One JSON line per event, to its own file, so it can be shipped and kept apart from
the service log."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

import orjson


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._stream: IO[bytes] | None = None

    def open(self) -> None:
        if self._path is None:
            self._stream = sys.stderr.buffer
        else:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Append mode: each line is one write(), so several workers can share the file.
            self._stream = open(self._path, "ab", buffering=0)  # noqa: SIM115

    def close(self) -> None:
        if self._stream is not None and self._path is not None:
            self._stream.close()
        self._stream = None

    def security_event(self, kind: str, request_id: str, **detail: object) -> None:
        record = {"time": time.time(), "kind": kind, "request_id": request_id, **detail}
        if self._stream is not None:
            self._stream.write(orjson.dumps(record) + b"\n")
