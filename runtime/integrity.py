"""Whether a flow may be deployed: lfx's own checks, then the runtime's rules on top.

lfx validation (levels 1, 3 and 4 of `lfx validate`: structure, edges, required inputs)
runs first. Then the rules of this runtime, because a flow carries each component's Python
source and running it means running whatever the seller uploaded:

- every node's component type must be installed here, and its code must be exactly the
  installed component's code (a full comparison, not lfx's 12-character hash);
- components that execute code from their inputs (lfx's own list) are refused;
- the runtime's credential variables may only feed credential fields, so a flow cannot
  route the LLM key into a prompt and read it back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from runtime.components import ComponentCatalogue
from runtime.config import LLM_API_KEY_VARIABLE, LLM_BASE_URL_VARIABLE
from runtime.errors import InvalidFlow

_NOTE_NODE_TYPES = frozenset({"noteNode", "note"})
_BASE_URL_FIELD_SUFFIXES = ("api_base", "base_url")
_MAX_PROBLEMS_SHOWN = 5


def check_flow(flow: Mapping[str, Any], catalogue: ComponentCatalogue) -> dict[str, Any]:
    """Return the flow with code normalised to strings, or raise `InvalidFlow` naming nodes."""
    from lfx.utils.flow_code import normalize_code_for_import

    if not isinstance(flow, Mapping):
        raise InvalidFlow("the flow must be a JSON object in Langflow's export format")
    problems = _lfx_validation_errors(dict(flow))
    if problems:
        raise InvalidFlow(_summary(problems))
    try:
        normalized: dict[str, Any] = normalize_code_for_import(dict(flow))
    except ValueError as exc:
        raise InvalidFlow(f"malformed component code: {exc}") from exc
    nodes = _walk_nodes(normalized["data"])
    problems = [problem for node in nodes for problem in _node_problems(node, catalogue)]
    if problems:
        raise InvalidFlow(_summary(problems))
    return normalized


def _lfx_validation_errors(flow: dict[str, Any]) -> list[str]:
    from lfx.cli.validation import (
        ValidationResult,
        _check_edge_type_compatibility,
        _check_required_inputs,
        _check_structural,
    )

    result = ValidationResult(path=Path(str(flow.get("id", "flow"))))
    if _check_structural(flow, result):
        _check_edge_type_compatibility(flow, result)
        _check_required_inputs(flow, result)
    problems = []
    for issue in result.errors:
        where = f"node {issue.node_id} ({issue.node_name}): " if issue.node_id else ""
        problems.append(f"{where}{issue.message}")
    return problems


def _walk_nodes(graph: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every node, including the inner nodes of grouped components, which run too."""
    for node in graph.get("nodes") or []:
        if not isinstance(node, Mapping):
            continue
        yield node
        inner = ((node.get("data") or {}).get("node") or {}).get("flow")
        if isinstance(inner, Mapping) and isinstance(inner.get("data"), Mapping):
            yield from _walk_nodes(inner["data"])


def _node_problems(node: Mapping[str, Any], catalogue: ComponentCatalogue) -> Iterator[str]:
    from lfx.utils.flow_validation import is_code_execution_component

    if node.get("type") in _NOTE_NODE_TYPES:
        return
    data = node.get("data") or {}
    info = data.get("node") or {}
    component_type = data.get("type")
    label = f"node {node.get('id')} ({info.get('display_name') or component_type})"
    template = info.get("template")
    if not isinstance(component_type, str) or not isinstance(template, Mapping):
        yield f"{label} is not a component node"
        return
    installed = catalogue.code_for(component_type)
    if installed is None:
        yield f"{label} uses component type {component_type!r}, which is not installed"
        return
    code_field = template.get("code")
    code = code_field.get("value") if isinstance(code_field, Mapping) else None
    # A grouped component is a container: its inner nodes carry the code that runs.
    if code is None and isinstance(info.get("flow"), Mapping):
        return
    if code != installed:
        yield f"{label} carries code that differs from the installed {component_type!r} component"
    if is_code_execution_component(component_type, info.get("display_name")):
        yield f"{label} executes code from its inputs, which this runtime does not allow"
    yield from _credential_problems(label, template)


def _credential_problems(label: str, template: Mapping[str, Any]) -> Iterator[str]:
    for name, field in template.items():
        if not isinstance(field, Mapping) or not field.get("load_from_db"):
            continue
        variable = field.get("value")
        if variable == LLM_API_KEY_VARIABLE and not field.get("password"):
            yield f"{label} field {name!r} may not read {LLM_API_KEY_VARIABLE}"
        if variable == LLM_BASE_URL_VARIABLE and not name.endswith(_BASE_URL_FIELD_SUFFIXES):
            yield f"{label} field {name!r} may not read {LLM_BASE_URL_VARIABLE}"


def _summary(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
    more = len(problems) - _MAX_PROBLEMS_SHOWN
    return f"{shown}; and {more} more" if more > 0 else shown
