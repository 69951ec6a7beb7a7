"""Importing a seller's flow: the Langflow JSON they pasted, checked before it becomes a version.

The checks, in order: a JSON object under the size limit; exactly one chat input and one chat
output; secrets pasted into credential fields stripped (never stored) and reported; then the
runtime's own check (`runtime.integrity.check_flow`: lfx's validation, installed components
only, their code unchanged), so the CMP refuses exactly what the runtime would refuse at deploy.

A credential field may keep only a reference to one of the runtime's credential variables. A
pasted key in a node that already points at the runtime's model (its base URL reads
SITEKIT_LLM_BASE_URL) is replaced by a reference to SITEKIT_LLM_API_KEY, since that node would
send its key to the runtime's model anyway; elsewhere the field is emptied.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from cmp.errors import InvalidInput, TooLarge
from runtime.components import ComponentCatalogue
from runtime.config import CREDENTIAL_VARIABLES, LLM_API_KEY_VARIABLE, LLM_BASE_URL_VARIABLE
from runtime.errors import InvalidFlow
from runtime.integrity import check_flow
from runtime.lfx_setup import prepare_lfx

MAX_FLOW_BYTES = 1024 * 1024
CHAT_INPUT = "ChatInput"
CHAT_OUTPUT = "ChatOutput"
_BASE_URL_FIELD_SUFFIXES = ("api_base", "base_url")
_SECRET_INPUT_TYPES = frozenset({"SecretStrInput"})


@dataclass(frozen=True, slots=True)
class ValidatedFlow:
    flow: dict[str, Any]
    stripped_secrets: list[str]  # "node_id.field" of each credential field emptied or replaced
    warnings: list[str]


def _invalid(problem: str) -> InvalidInput:
    return InvalidInput(f"the flow is not valid: {problem}", fields={"flow": problem})


# lfx's component index is process-wide and what is installed does not change while the
# process runs, so it is loaded once, off the event loop (it takes seconds).
_catalogue_lock = threading.Lock()


@functools.cache
def _load_catalogue() -> ComponentCatalogue:
    prepare_lfx("warning")
    return asyncio.run(ComponentCatalogue.load())


def installed_components() -> ComponentCatalogue:
    with _catalogue_lock:
        return _load_catalogue()


async def validate_flow(raw: object) -> ValidatedFlow:
    """The flow to store, or InvalidInput / TooLarge naming the nodes at fault."""
    if not isinstance(raw, Mapping):
        raise _invalid("the flow must be a JSON object in Langflow's export format")
    encoded = orjson.dumps(raw)
    if len(encoded) > MAX_FLOW_BYTES:
        problem = (f"the flow is {len(encoded)} bytes; the limit is 1 MiB "
                   f"({MAX_FLOW_BYTES} bytes)")
        raise TooLarge(problem, fields={"flow": problem})
    flow = orjson.loads(encoded)  # a private copy, stripped in place
    if not isinstance(flow.get("data"), Mapping) or not isinstance(flow["data"].get("nodes"),
                                                                   list):
        raise _invalid("the flow has no data.nodes; paste the JSON Langflow exports")
    _check_chat_ends(flow)
    stripped, warnings = _strip_secrets(flow)
    catalogue = await asyncio.to_thread(installed_components)
    try:
        normalized = await asyncio.to_thread(check_flow, flow, catalogue)
    except InvalidFlow as exc:
        problem = exc.message
        if stripped:
            problem += (f" (pasted secrets were removed from {', '.join(stripped)}; point "
                        "credential fields at a global variable the runtime provides: "
                        f"{', '.join(sorted(CREDENTIAL_VARIABLES))})")
        raise _invalid(problem) from None
    return ValidatedFlow(normalized, stripped, warnings)


def _nodes(graph: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node, including the inner nodes of grouped components (they run too)."""
    for node in graph.get("nodes") or []:
        if not isinstance(node, dict):
            continue
        yield node
        inner = ((node.get("data") or {}).get("node") or {}).get("flow")
        if isinstance(inner, Mapping) and isinstance(inner.get("data"), Mapping):
            yield from _nodes(inner["data"])


def _component_type(node: Mapping[str, Any]) -> object:
    data = node.get("data")
    return data.get("type") if isinstance(data, Mapping) else None


def _check_chat_ends(flow: Mapping[str, Any]) -> None:
    problems = []
    for kind, what in ((CHAT_INPUT, "chat input"), (CHAT_OUTPUT, "chat output")):
        found = [str(n.get("id")) for n in _nodes(flow["data"]) if _component_type(n) == kind]
        if not found:
            problems.append(f"the flow needs one {what} ({kind}) node and has none")
        elif len(found) > 1:
            problems.append(f"the flow needs exactly one {what} ({kind}) node and has "
                            f"{len(found)}: {', '.join(f'node {n}' for n in found)}")
    if problems:
        raise _invalid("; ".join(problems))


def _is_credential(field: Mapping[str, Any]) -> bool:
    return bool(field.get("password")) or field.get("_input_type") in _SECRET_INPUT_TYPES


def _reads_runtime_model(template: Mapping[str, Any]) -> bool:
    return any(
        isinstance(field, Mapping) and name.endswith(_BASE_URL_FIELD_SUFFIXES)
        and field.get("load_from_db") and field.get("value") == LLM_BASE_URL_VARIABLE
        for name, field in template.items()
    )


def _strip_secrets(flow: dict[str, Any]) -> tuple[list[str], list[str]]:
    stripped: list[str] = []
    warnings: list[str] = []
    for node in _nodes(flow["data"]):
        template = ((node.get("data") or {}).get("node") or {}).get("template")
        if not isinstance(template, dict):
            continue
        for name, field in template.items():
            if not isinstance(field, dict) or not _is_credential(field):
                continue
            value = field.get("value")
            if not value or (field.get("load_from_db") and value in CREDENTIAL_VARIABLES):
                continue
            where = f"{node.get('id')}.{name}"
            stripped.append(where)
            note = (f"node {node.get('id')} field {name!r}: its value was removed (a credential "
                    "field keeps no secret, only a variable the runtime provides)")
            if _reads_runtime_model(template):
                field.update(value=LLM_API_KEY_VARIABLE, load_from_db=True)
                warnings.append(f"{note}; it now reads the runtime's model key "
                                f"({LLM_API_KEY_VARIABLE})")
            else:
                field.update(value="", load_from_db=False)
                warnings.append(f"{note}; the field is left empty")
    return stripped, warnings
