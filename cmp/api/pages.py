"""Keyset pagination: `limit` (at most 100) and an opaque `cursor` naming the last row seen, so
page 1,000 costs what page 1 costs."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel

from cmp.errors import InvalidInput

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
# Below every id: the keyset bound of a first page, so the same index range serves every page.
FIRST_ID = uuid.UUID(int=0)

Item = TypeVar("Item", bound=BaseModel)


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    next_cursor: str | None


def encode_cursor(values: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(values), default=str)).decode().rstrip("=")


def bigint(value: Any) -> int:
    """A cursor's integer, within PostgreSQL's bigint (a forged one is refused, not a 500)."""
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
        raise ValueError("not a bigint")
    return value


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int
    after: list[Any] | None

    @classmethod
    def parse(
        cls, limit: str | None, cursor: str | None, types: Sequence[Callable[[Any], Any]]
    ) -> PageRequest:
        """`types` convert each value of the cursor back (uuid.UUID, int, ...)."""
        problems: dict[str, str] = {}
        size = DEFAULT_LIMIT
        if limit is not None:
            try:
                size = int(limit)
            except ValueError:
                size = 0
            if not 1 <= size <= MAX_LIMIT:
                problems["limit"] = f"must be a whole number from 1 to {MAX_LIMIT}"
        after = None
        if cursor:
            try:
                padded = cursor + "=" * (-len(cursor) % 4)
                after = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
            except (binascii.Error, orjson.JSONDecodeError, UnicodeEncodeError, ValueError):
                after = None
            try:
                if not isinstance(after, list) or len(after) != len(types):
                    raise ValueError("wrong shape")
                after = [convert(value) for convert, value in zip(types, after, strict=True)]
            except (ValueError, TypeError, AttributeError):
                problems["cursor"] = "is not a cursor this list gave out"
                after = None
        if problems:
            raise InvalidInput("invalid pagination", fields=problems)
        return cls(size, after)

    def page(self, rows: Sequence[Item], key: Callable[[Item], Sequence[Any]]) -> Page[Item]:
        """Rows were fetched with `LIMIT limit + 1`: the extra one says another page exists."""
        items = list(rows[: self.limit])
        more = len(rows) > self.limit
        return Page[Any](items=items, next_cursor=encode_cursor(key(items[-1])) if more else None)
