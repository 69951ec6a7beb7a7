"""Deployed flows and their runs on the lfx engine.

A deploy validates the flow (runtime.integrity) and lets lfx parse it once
(`Graph.from_payload`, which also migrates legacy component references). The parsed graph is
kept pickled, without component instances, through lfx's own pickling support (the one its
graph cache uses: vertices drop their components, locks and secrets). Every run unpickles
its own copy and lfx instantiates fresh components for it, so runs never share mutable
component state; this costs about a millisecond where `copy.deepcopy` of a graph costs tens.

Per-request variables (tenant_id, agent_id, collection, request_id, ...) and the runtime's
LLM variables become the graph's `request_variables`, which is where lfx resolves global
variables (load_from_db fields, `Component.get_variable`); the process environment is never
consulted (`no_env_fallback`), so a flow cannot read the runtime's own secrets from it.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from runtime.components import ComponentCatalogue
from runtime.config import CREDENTIAL_VARIABLES, RuntimeConfig
from runtime.errors import FlowNotFound, InvalidFlow, InvalidRequest
from runtime.flow_store import FlowStore, check_flow_id
from runtime.integrity import check_flow
from runtime.retrieval import CONTEXT_KEY, TenantDocuments
from runtime.token_events import TokenEvents

log = logging.getLogger("runtime.engine")

# lfx wants a user id on every run; the runtime runs flows as one service identity and scopes
# nothing by it (messages are not persisted, variables come from the request).
RUNTIME_USER_ID = "00000000-0000-4000-8000-00000000517e"
_GRAPH_ID_NAMESPACE = uuid.UUID("5e1f6d0c-6b8e-4c61-9a55-2f1d9d0b7a10")


@dataclass(frozen=True, slots=True)
class DeployedFlow:
    flow_id: str
    version: int
    name: str
    graph_id: str
    template: bytes
    stamp: int


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One turn; `variables` are the run's global variables (`FlowEngine.request_variables`)."""

    input_value: str
    session_id: str
    variables: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RunResult:
    text: str | None
    input_tokens: int
    output_tokens: int


class FlowEngine:
    """The flows this worker serves; the store on disk is the source of truth across workers."""

    def __init__(
        self, config: RuntimeConfig, catalogue: ComponentCatalogue, store: FlowStore,
        documents: TenantDocuments | None = None,
    ) -> None:
        self._catalogue = catalogue
        self._documents = documents
        self._store = store
        self._credentials = config.credential_variables()
        self._flows: dict[str, DeployedFlow] = {}

    def load_stored(self) -> None:
        for flow_id in self._store.flow_ids():
            try:
                self.get(flow_id)
            except Exception:  # one bad file must not keep the others from serving
                log.exception("skipping stored flow %s", flow_id)

    def deploy(self, flow_id: str, version: int, flow: Any) -> DeployedFlow:
        check_flow_id(flow_id)
        normalized = check_flow(flow, self._catalogue)
        graph_id, name, template = self._parse(flow_id, normalized)
        stamp = self._store.save(flow_id, version, normalized)
        deployed = DeployedFlow(flow_id, version, name, graph_id, template, stamp)
        self._flows[flow_id] = deployed
        return deployed

    def undeploy(self, flow_id: str) -> None:
        self._flows.pop(flow_id, None)
        if not self._store.delete(flow_id):
            raise FlowNotFound(f"flow {flow_id!r} is not deployed")

    def list(self) -> list[DeployedFlow]:
        flows = []
        for flow_id in self._store.flow_ids():
            try:
                flows.append(self.get(flow_id))
            except (FlowNotFound, InvalidFlow):
                continue
        return flows

    def get(self, flow_id: str) -> DeployedFlow:
        """The deployed flow, reloaded when another worker redeployed or undeployed it."""
        stamp = self._store.stamp(check_flow_id(flow_id))
        held = self._flows.get(flow_id)
        if stamp is None:
            self._flows.pop(flow_id, None)
            raise FlowNotFound(f"flow {flow_id!r} is not deployed")
        if held is not None and held.stamp == stamp:
            return held
        stored = self._store.load(flow_id)
        if stored is None:
            raise FlowNotFound(f"flow {flow_id!r} is not deployed")
        graph_id, name, template = self._parse(flow_id, check_flow(stored.flow, self._catalogue))
        deployed = DeployedFlow(flow_id, stored.version, name, graph_id, template, stored.stamp)
        self._flows[flow_id] = deployed
        return deployed

    def _parse(self, flow_id: str, flow: dict[str, Any]) -> tuple[str, str, bytes]:
        from lfx.graph import Graph

        graph_id = str(uuid.uuid5(_GRAPH_ID_NAMESPACE, flow_id))
        name = str(flow.get("name") or flow_id)
        try:
            # Built once with components, so a flow whose components cannot even be
            # constructed is refused at deploy rather than on its first run.
            Graph.from_payload(
                orjson.loads(orjson.dumps(flow)), flow_id=graph_id, flow_name=name,
                user_id=RUNTIME_USER_ID,
            ).prepare()
            template = Graph.from_payload(
                flow, flow_id=graph_id, flow_name=name, user_id=RUNTIME_USER_ID,
                instantiate_components=False,
            )
            return graph_id, name, pickle.dumps(template, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise InvalidFlow(f"lfx cannot build the flow: {exc}") from exc

    def request_variables(self, variables: Mapping[str, Any]) -> dict[str, str]:
        """The run's global variables; the runtime's own always win and cannot be sent."""
        reserved = CREDENTIAL_VARIABLES.intersection(variables)
        if reserved:
            raise InvalidRequest(f"variables {sorted(reserved)} are reserved by the runtime")
        merged = {str(k): str(v) for k, v in variables.items() if v is not None}
        merged.update(self._credentials)
        return merged

    def fresh_graph(self, flow: DeployedFlow, request: RunRequest) -> Any:
        """A graph of its own for one run, its components still to be built."""
        from lfx.graph import Graph
        from lfx.run._defaults import apply_run_defaults

        context: dict[str, Any] = {
            "request_variables": dict(request.variables), "no_env_fallback": True,
            # Read by our installed retrieval component; runtime objects, never variables.
            CONTEXT_KEY: self._documents,
        }
        blank = Graph(flow_id=flow.graph_id, flow_name=flow.name, user_id=RUNTIME_USER_ID,
                      context=context)
        graph = pickle.loads(flow.template)  # noqa: S301 - our own bytes, made at deploy
        # lfx's pickled state covers what runs need; the rest is a new graph's defaults.
        for name, value in blank.__dict__.items():
            graph.__dict__.setdefault(name, value)
        graph._instantiate_components_on_initialize = True
        graph.persist_messages = False
        # lfx deep-copies the scheduler state after every step for its debugger; a run here
        # keeps only the call order (what checkpoints read).
        graph._record_snapshot = partial(_record_call, graph)
        apply_run_defaults(graph, session_id=request.session_id, user_id=RUNTIME_USER_ID)
        return graph

    async def run(
        self, flow: DeployedFlow, request: RunRequest, tokens: asyncio.Queue[str]
    ) -> RunResult:
        """Run one turn; model tokens go to `tokens` as they stream. Cancel to stop it."""
        from lfx.schema.schema import InputValueRequest
        from lfx.services.variable.request_scope import (
            activate_no_env_fallback,
            activate_request_variables,
            reset_no_env_fallback,
            reset_request_variables,
        )

        graph = self.fresh_graph(flow, request)
        # Context variables are per task: these scopes end with this run's task.
        variables = activate_request_variables(graph.context["request_variables"])
        no_env = activate_no_env_fallback(disabled=True)
        try:
            inputs = InputValueRequest.model_validate(
                {"input_value": request.input_value, "session": request.session_id}
            )
            await _drive(graph, inputs, TokenEvents(tokens))
        finally:
            reset_no_env_fallback(no_env)
            reset_request_variables(variables)
        return _result(graph)


def _record_call(graph: Any, vertex_id: str | None = None) -> None:
    if vertex_id:
        graph._call_order.append(vertex_id)


async def _drive(graph: Any, inputs: Any, events: TokenEvents) -> None:
    """`Graph.async_start` minus what only Langflow's UI reads.

    async_start serialises every vertex's result (`result_dict.model_dump()`) for an
    `end_vertex` event this runtime drops, and opens a tracing span lfx leaves unused here.
    The steps are the same: prepare, reset outputs, start the run, step until `Finish`.
    """
    from lfx.graph.graph.constants import Finish

    graph.prepare()
    graph._reset_all_output_values()
    await graph.initialize_run()
    while not isinstance(await graph.astep(inputs=inputs, event_manager=events), Finish):
        pass


def _result(graph: Any) -> RunResult:
    for vertex in graph.vertices:
        if not vertex.is_output:
            continue
        message = (vertex.results or {}).get("message")
        text = getattr(message, "text", None)
        if not isinstance(text, str):
            continue
        usage = getattr(getattr(message, "properties", None), "usage", None)
        return RunResult(
            text=text,
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        )
    return RunResult(text=None, input_tokens=0, output_tokens=0)
