"""Build the retrieval variant of the demo flow and write it in Langflow's export format.

    python -m runtime.flows.build_retrieval [output.json]   (default: runtime/flows/retrieval.json)

Chat Input -> Tenant Documents (ours, runtime/lfx_components) -> Prompt Template -> OpenAI
(lfx-openai, streaming) -> Chat Output; the question also goes to the prompt. Tenant
Documents searches the collection the gateway names in the run's variables, so one deployed
flow answers every tenant from that tenant's own documents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from runtime.config import LLM_API_KEY_VARIABLE, LLM_BASE_URL_VARIABLE
from runtime.flows.build_demo import export_flow

RETRIEVAL_FLOW_ID = "3e8b5a71-2c4d-4f6e-8a9b-0c1d2e3f4a5b"
RETRIEVAL_TEMPLATE = (
    "You are the shop's support agent. Answer briefly and kindly, using only the shop's "
    "documents below.\n\nDocuments:\n{context}\n\nQuestion: {question}"
)
DEFAULT_OUTPUT = Path(__file__).with_name("retrieval.json")


def build_flow(
    *, name: str = "Site Kit demo agent with documents", flow_id: str = RETRIEVAL_FLOW_ID,
    number_of_results: int = 3,
) -> dict[str, Any]:
    from lfx.components.input_output import ChatInput, ChatOutput
    from lfx.components.models_and_agents.prompt import PromptComponent
    from lfx.graph import Graph
    from lfx_openai.components.openai.openai_chat_model import OpenAIModelComponent

    from runtime.lfx_components.sitekit.tenant_documents import TenantDocumentsComponent

    chat_input = ChatInput(_id="ChatInput-sk001")
    documents = TenantDocumentsComponent(_id="TenantDocuments-sk005")
    documents.set(  # type: ignore[no-untyped-call]
        search_query=chat_input.message_response, number_of_results=number_of_results
    )
    prompt = PromptComponent(_id="Prompt-sk002")
    prompt.set(template=RETRIEVAL_TEMPLATE)  # type: ignore[no-untyped-call]
    prompt.set(  # type: ignore[no-untyped-call]
        question=chat_input.message_response, context=documents.retrieve_context
    )
    model = OpenAIModelComponent(_id="OpenAIModel-sk003")
    model.set(
        input_value=prompt.build_prompt, stream=True, model_name="gpt-4o-mini",
        api_key=LLM_API_KEY_VARIABLE, openai_api_base=LLM_BASE_URL_VARIABLE,
    )
    chat_output = ChatOutput(_id="ChatOutput-sk004")
    chat_output.set(input_value=model.text_response)  # type: ignore[no-untyped-call]
    dumped: dict[str, Any] = dict(Graph(chat_input, chat_output).dump(name=name))
    variables = {
        ("OpenAIModel-sk003", "api_key"): LLM_API_KEY_VARIABLE,
        ("OpenAIModel-sk003", "openai_api_base"): LLM_BASE_URL_VARIABLE,
    }
    return export_flow(
        dumped, variables, name=name, flow_id=flow_id,
        description="Chat Input -> Tenant Documents -> Prompt -> OpenAI (streaming) -> Chat Output",
    )


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    text = json.dumps(build_flow(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
