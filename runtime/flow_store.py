"""Deployed flows on disk, one JSON file per flow, so a restart (or another worker) finds them.

A file holds `{"flow_id", "version", "flow"}`. Writes go to a temporary file first and are
renamed into place, so a reader never sees half a flow. The file's modification stamp is the
deployment's identity: a worker that holds an older stamp reloads, a missing file means the
flow was undeployed.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from runtime.errors import InvalidRequest

FLOW_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_flow_id(flow_id: str) -> str:
    if not FLOW_ID_PATTERN.match(flow_id):
        raise InvalidRequest(
            "flow_id must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return flow_id


@dataclass(frozen=True, slots=True)
class StoredFlow:
    flow_id: str
    version: int
    flow: dict[str, Any]
    stamp: int


class FlowStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, flow_id: str) -> Path:
        return self.directory / f"{check_flow_id(flow_id)}.json"

    def save(self, flow_id: str, version: int, flow: dict[str, Any]) -> int:
        """Write the flow and return its stamp."""
        path = self._path(flow_id)
        body = orjson.dumps({"flow_id": flow_id, "version": version, "flow": flow})
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{flow_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path.stat().st_mtime_ns

    def delete(self, flow_id: str) -> bool:
        try:
            self._path(flow_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def stamp(self, flow_id: str) -> int | None:
        try:
            return self._path(flow_id).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def load(self, flow_id: str) -> StoredFlow | None:
        path = self._path(flow_id)
        try:
            stamp = path.stat().st_mtime_ns
            raw = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        return StoredFlow(
            flow_id=str(raw["flow_id"]), version=int(raw["version"]), flow=raw["flow"], stamp=stamp
        )

    def flow_ids(self) -> list[str]:
        return sorted(
            path.stem for path in self.directory.glob("*.json") if FLOW_ID_PATTERN.match(path.stem)
        )
