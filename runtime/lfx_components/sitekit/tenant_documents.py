"""Site Kit: the chunks of the requesting agent instance's training documents closest to a text.

Installed in the runtime through lfx's components path; a flow node carrying this code runs it.
"""
# lfx's inputs are pydantic models built dynamically; mypy sees none of their fields.
# mypy: disable-error-code="call-arg"

from lfx.custom.custom_component.component import Component
from lfx.io import IntInput, MessageTextInput, Output
from lfx.schema.message import Message

from runtime.retrieval import CONTEXT_KEY, MAX_RESULTS, RetrievalError

SEPARATOR = "\n\n---\n\n"


class TenantDocumentsComponent(Component):  # type: ignore[no-untyped-call]
    display_name = "Tenant Documents"
    description = (
        "The chunks of this agent instance's training documents closest to the query, from "
        "the collection the gateway names for the request."
    )
    icon = "database"
    name = "SiteKitTenantDocuments"

    inputs = [
        MessageTextInput(name="search_query", display_name="Search Query", required=True),
        IntInput(
            name="number_of_results", display_name="Number of Results", value=3,
            info=f"At most {MAX_RESULTS}.", advanced=True,
        ),
    ]
    outputs = [Output(display_name="Context", name="context", method="retrieve_context")]

    async def retrieve_context(self) -> Message:
        # The collection is the run's own variable, never an input of the flow.
        context = self.graph.context
        documents = context.get(CONTEXT_KEY)
        if documents is None:
            raise RetrievalError("this runtime has no documents database configured")
        chunks = await documents.search(
            context.get("request_variables") or {}, str(self.search_query or ""),
            int(self.number_of_results or 3),
        )
        self.status = f"{len(chunks)} chunks"
        return Message(text=SEPARATOR.join(chunks))
