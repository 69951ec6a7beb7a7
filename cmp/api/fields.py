"""Field types shared by the API's request bodies. Text is stored verbatim, so the only
character refused is NUL, which PostgreSQL's text cannot hold."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

_NO_NUL = r"^[^\x00]*$"

Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=_NO_NUL)]
Text = Annotated[str, StringConstraints(max_length=4000, pattern=_NO_NUL)]
Email = Annotated[
    str, StringConstraints(min_length=3, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")
]


class Body(BaseModel):
    """A request body: unknown fields are refused, so a typo is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
