"""Build the demo flow from the installed lfx components and write it in Langflow's export format.

    python -m runtime.flows.build_demo [output.json]   (default: runtime/flows/demo.json)

Chat Input -> Prompt Template -> OpenAI (lfx-openai, streaming) -> Chat Output. The graph is
built in Python from the component classes, so every node embeds exactly the installed
component code, which is what the runtime's integrity check demands. The model's base URL
and key are Langflow global variables (load_from_db) that the runtime resolves from its own
configuration; the file carries no URL and no secret.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from runtime.config import LLM_API_KEY_VARIABLE, LLM_BASE_URL_VARIABLE

DEMO_FLOW_ID = "7c1d2f4e-5a6b-4c8d-9e0f-1a2b3c4d5e6f"
DEMO_TEMPLATE = (
    "You are the shop's support agent. Answer briefly and kindly.\n\nQuestion: {question}"
)
DEFAULT_OUTPUT = Path(__file__).with_name("demo.json")


def build_flow(
    *,
    template: str = DEMO_TEMPLATE,
    prompt_variables: Mapping[str, str] | None = None,
    name: str = "Site Kit demo agent",
    flow_id: str = DEMO_FLOW_ID,
) -> dict[str, Any]:
    """The demo flow as Langflow exports it.

    `prompt_variables` maps extra `{placeholders}` of the template to global variables, so
    a flow can show per-request variables (tenant_id, collection, ...) reaching a component.
    """
    from lfx.components.input_output import ChatInput, ChatOutput
    from lfx.components.models_and_agents.prompt import PromptComponent
    from lfx.graph import Graph
    from lfx_openai.components.openai.openai_chat_model import OpenAIModelComponent

    chat_input = ChatInput(_id="ChatInput-sk001")
    prompt = PromptComponent(_id="Prompt-sk002")
    prompt.set(template=template)  # type: ignore[no-untyped-call]
    model = OpenAIModelComponent(_id="OpenAIModel-sk003")
    chat_output = ChatOutput(_id="ChatOutput-sk004")
    prompt.set(question=chat_input.message_response)  # type: ignore[no-untyped-call]
    model.set(
        input_value=prompt.build_prompt, stream=True, model_name="gpt-4o-mini",
        api_key=LLM_API_KEY_VARIABLE, openai_api_base=LLM_BASE_URL_VARIABLE,
    )
    chat_output.set(input_value=model.text_response)  # type: ignore[no-untyped-call]
    dumped: dict[str, Any] = dict(Graph(chat_input, chat_output).dump(name=name))
    variables = {
        ("OpenAIModel-sk003", "api_key"): LLM_API_KEY_VARIABLE,
        ("OpenAIModel-sk003", "openai_api_base"): LLM_BASE_URL_VARIABLE,
        **{("Prompt-sk002", field): var for field, var in (prompt_variables or {}).items()},
    }
    return export_flow(
        dumped, variables, name=name, flow_id=flow_id,
        description="Chat Input -> Prompt -> OpenAI (streaming) -> Chat Output",
    )


def export_flow(
    dumped: dict[str, Any], variables: Mapping[tuple[str, str], str], *, name: str,
    flow_id: str, description: str,
) -> dict[str, Any]:
    """A graph dumped by lfx in Langflow's export format; `variables` maps (node, field) to the
    global variable the field reads (load_from_db)."""
    # A connected input takes its value from the edge; lfx leaves a placeholder message
    # (with a timestamp) in the field, where Langflow's exports have an empty value.
    connected = {
        (edge["target"], edge["data"]["targetHandle"]["fieldName"])
        for edge in dumped["data"]["edges"]
    }
    # lfx walks sets while dumping; sorting keeps the file the same from one build to the next.
    nodes = sorted(
        (_export_node(n, variables, connected) for n in dumped["data"]["nodes"]), key=_by_id
    )
    edges = sorted((_export_edge(e) for e in dumped["data"]["edges"]), key=_by_id)
    flow: dict[str, Any] = {
        "id": flow_id,
        "name": name,
        "description": description,
        "endpoint_name": None,
        "is_component": False,
        "last_tested_version": version("lfx"),
        "tags": [],
        "data": {"nodes": nodes, "edges": edges, "viewport": {"x": 0, "y": 0, "zoom": 1}},
    }
    from lfx.graph.flow_builder import layout_flow

    layout_flow(flow)
    return flow


def _by_id(item: dict[str, Any]) -> str:
    return str(item["id"])


def _export_node(
    node: dict[str, Any], variables: Mapping[tuple[str, str], str],
    connected: set[tuple[str, str]],
) -> dict[str, Any]:
    template = node["data"]["node"]["template"]
    for node_id, field in connected:
        if node_id == node["id"] and isinstance(template.get(field), dict):
            template[field]["value"] = ""
    for (node_id, field), variable in variables.items():
        if node_id != node["id"]:
            continue
        if field not in template:
            raise ValueError(f"{node_id} has no field {field!r}")
        template[field]["value"] = variable
        template[field]["load_from_db"] = True
    return {
        "id": node["id"],
        "type": "genericNode",
        "position": {"x": 0, "y": 0},
        "selected": False,
        "data": {**node["data"], "showNode": True},
    }


def _export_edge(edge: dict[str, Any]) -> dict[str, Any]:
    from lfx.graph.flow_builder.connect import _scaped_json_stringify

    source_handle = _scaped_json_stringify(edge["data"]["sourceHandle"])
    target_handle = _scaped_json_stringify(edge["data"]["targetHandle"])
    return {
        "animated": False,
        "className": "",
        "data": edge["data"],
        "id": f"reactflow__edge-{edge['source']}{source_handle}-{edge['target']}{target_handle}",
        "selected": False,
        "source": edge["source"],
        "sourceHandle": source_handle,
        "target": edge["target"],
        "targetHandle": target_handle,
    }


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    text = json.dumps(build_flow(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
