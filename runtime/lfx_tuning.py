"""Make a chat turn on lfx cheap in CPU without changing what a flow computes.

A profile of the stock engine on the demo flow (see loadtest/bench_runtime.py) shows where a
turn's CPU goes; each patch below removes one of those costs and says which:

- provider HTTP clients: lfx builds a new sync and async httpx client, each with a fresh
  SSL context (~50 ms apiece), for the model component on every turn. The clients are kept
  per validated endpoint instead; the SSRF validation and DNS pinning still run per turn.
- component classes: every turn execs and compiles each node's source again. Deployed
  code is the installed code (runtime.integrity), so the class is built once per source.
- LLM connections: the OpenAI SDK stops reading a streamed answer at its `[DONE]` event and
  closes the response before the end of the HTTP body has been read, and httpcore closes a
  connection whose response is not complete, so every turn opened a new connection (a new
  TLS handshake for a remote LLM) despite the shared pool. The few bytes after `[DONE]`
  are read (within `_STREAM_END_S`), and the connection goes back to the pool.
- stream chunks: the OpenAI SDK builds each chunk with its lenient pure-Python
  `construct_type` (~290 us). Validating with the model's pydantic-core schema gives the
  same object in ~15 us; anything that does not validate takes the stock path.
- token and message events: lfx hands every token to a thread (`asyncio.to_thread`) and
  serialises every message event, for a UI the runtime does not have. Runs whose event
  manager is a `runtime.token_events.TokenEvents` get tokens inline and no message events,
  and their chat vertices skip the YAML rendering of artifacts meant for that UI.
- component templates: each component instance deep-copies its class's input and output
  templates twice (pydantic `model_copy(deep=True)`, then `copy.deepcopy`). A pickle round
  trip makes the same independent copies about six times faster; the class templates are
  pickled once.
- chat models: the model component builds a new `ChatOpenAI` every turn, and validating one
  (it builds the OpenAI SDK clients) costs about as much as the rest of the component. One
  is built per set of parameters; each turn gets a shallow copy of it (`model_copy`), so a
  turn that changes its model (lfx's remediation of provider errors sets fields on it)
  changes its own copy only. The SDK clients it shares keep no state between requests.
- file-field metadata: every vertex build scans the whole component index and parses the
  node's source to learn which fields are file inputs. The answer depends on the source
  only, so it is kept per source.

Installed once per process by the server; the benchmark installs it around each runtime
turn and uninstalls it around each turn of the stock engine it compares against.
"""

from __future__ import annotations

import pickle
import ssl
from collections.abc import Callable
from typing import Any

import httpx

# One pool per endpoint for every run in the worker: no per-run connection limit beyond
# what the LLM endpoint accepts, and warm keep-alive connections between turns.
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30)
# Distinct model parameters seen (flows x models x keys); past this the models are built anew.
_MAX_MODELS = 256
# The end of the body follows `[DONE]` at once (the same write, or the next); an endpoint that
# holds the body open longer loses its connection, as it would without the patch.
_STREAM_END_S = 0.25


class EngineTuning:
    """The patches, their caches and their undo; `install()` once, `uninstall()` at exit."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._clients: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
        self._classes: dict[tuple[str, str | None], type] = {}
        self._ssl: ssl.SSLContext | None = None
        self._templates: dict[int, tuple[list[Any], bytes | None]] = {}
        self._file_fields: dict[str, dict[str, dict[str, Any]]] = {}
        self._models: dict[tuple[Any, ...], Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._undo)

    def install(self) -> None:
        if self.installed:
            return
        try:
            self._patch_provider_clients()
            self._patch_component_classes()
            self._patch_stream_chunks()
            self._patch_stream_end()
            self._patch_component_events()
            self._patch_component_templates()
            self._patch_file_fields()
        except (AttributeError, ImportError) as exc:
            self.uninstall()
            raise RuntimeError(f"runtime.lfx_tuning is written for lfx 1.13: {exc}") from exc

    def uninstall(self) -> None:
        """Put lfx back as it came; the caches stay for a later `install()`."""
        while self._undo:
            self._undo.pop()()

    async def aclose(self) -> None:
        self.uninstall()
        self._classes.clear()
        self._templates.clear()
        self._file_fields.clear()
        self._models.clear()
        clients, self._clients = self._clients, {}
        for pair in clients.values():
            pair["http_client"].close()
            await pair["http_async_client"].aclose()

    def _replace(self, owner: Any, name: str, new: Any) -> Any:
        original = getattr(owner, name)
        setattr(owner, name, new)
        self._undo.append(lambda: setattr(owner, name, original))
        return original

    def _patch_provider_clients(self) -> None:
        import lfx.base.models.provider_ssrf as provider_ssrf
        from lfx.utils import ssrf_httpx
        from lfx.utils.ssrf_protection import SSRFProtectionError

        validate = ssrf_httpx._validate_and_resolve_strict_url
        pin_host = ssrf_httpx._transport_host
        require_https = provider_ssrf._require_https_for_credentialed_endpoint
        is_default = provider_ssrf._is_provider_default
        blocked = SSRFProtectionError

        def openai_compatible_client_kwargs(
            base_url: str | None, *, default_url: str | None = None
        ) -> dict[str, Any]:
            if is_default(base_url, default_url):
                return self._shared_clients(("", ()), None)
            assert base_url is not None
            try:
                validated_url, ips = validate(base_url)
            except blocked as exc:
                raise blocked(f"SSRF Protection: {exc}") from exc
            require_https(base_url)
            host = pin_host(validated_url)
            pinned = {host: list(ips)} if host and ips else None
            return self._shared_clients((host, tuple(ips)), pinned)

        # The component's source imports this name when its class is built, so the patch
        # has to be in place before the first run builds a class.
        self._replace(
            provider_ssrf, "openai_compatible_client_kwargs", openai_compatible_client_kwargs
        )

    def _shared_clients(
        self, key: tuple[str, tuple[str, ...]], pinned: dict[str, list[str]] | None
    ) -> dict[str, Any]:
        clients = self._clients.get(key)
        if clients is None:
            from lfx.utils.ssrf_transport import SSRFProtectedSyncTransport, SSRFProtectedTransport

            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            sync_transport: httpx.BaseTransport
            async_transport: httpx.AsyncBaseTransport
            if pinned:
                ssl_context = self._ssl
                sync_transport = SSRFProtectedSyncTransport(
                    pinned, verify=ssl_context, limits=_LIMITS
                )
                async_transport = SSRFProtectedTransport(pinned, verify=ssl_context, limits=_LIMITS)
            else:
                sync_transport = httpx.HTTPTransport(verify=self._ssl, limits=_LIMITS)
                async_transport = httpx.AsyncHTTPTransport(verify=self._ssl, limits=_LIMITS)
            clients = {
                "http_client": httpx.Client(transport=sync_transport, follow_redirects=False),
                "http_async_client": httpx.AsyncClient(
                    transport=async_transport, follow_redirects=False
                ),
            }
            self._clients[key] = clients
        return dict(clients)

    def _patch_component_classes(self) -> None:
        import lfx.interface.initialize.loading as loading
        from langchain_openai import ChatOpenAI

        build = loading.eval_custom_component_code  # type: ignore[attr-defined]
        classes = self._classes
        shared_chat_openai = self._shared_model(ChatOpenAI)

        def eval_custom_component_code(code: str, class_name: str | None = None) -> type:
            key = (code, class_name)
            cls = classes.get(key)
            if cls is None:
                cls = classes[key] = build(code, class_name)
                # The name the component's source imported, in the namespace only this
                # cached class uses (the stock path builds its classes anew).
                namespace = getattr(getattr(cls, "build_model", None), "__globals__", {})
                if namespace.get("ChatOpenAI") is ChatOpenAI:
                    namespace["ChatOpenAI"] = shared_chat_openai
            return cls

        self._replace(loading, "eval_custom_component_code", eval_custom_component_code)

    def _shared_model(self, model_class: type) -> Callable[..., Any]:
        models = self._models

        def build(**parameters: Any) -> Any:
            key = _model_key(model_class, parameters)
            if key is None:
                return model_class(**parameters)
            model = models.get(key)
            if model is None:
                if len(models) >= _MAX_MODELS:
                    models.clear()
                model = models[key] = model_class(**parameters)
            return model.model_copy()

        return build

    def _patch_stream_chunks(self) -> None:
        import pydantic
        from openai._base_client import BaseClient
        from openai.types.chat import ChatCompletionChunk

        stock = BaseClient._process_response_data

        def _process_response_data(
            client: Any, *, data: object, cast_to: type, response: httpx.Response
        ) -> Any:
            if cast_to is ChatCompletionChunk and isinstance(data, dict):
                try:
                    return ChatCompletionChunk.model_validate(data)
                except pydantic.ValidationError:
                    pass
            return stock(client, data=data, cast_to=cast_to, response=response)

        self._replace(BaseClient, "_process_response_data", _process_response_data)

    def _patch_stream_end(self) -> None:
        import asyncio
        from collections.abc import AsyncIterator

        from openai import AsyncStream
        from openai._streaming import ServerSentEvent

        async def _iter_events(stream: Any) -> AsyncIterator[ServerSentEvent]:
            events = stream._decoder.aiter_bytes(stream.response.aiter_bytes())
            async for event in events:
                if event.data.startswith("[DONE]"):
                    # Read to the end of the body: a response closed before its end also
                    # closes its connection (httpcore), one closed after it goes back to
                    # the pool. The answer is complete either way.
                    try:
                        async with asyncio.timeout(_STREAM_END_S):
                            async for _ in events:
                                pass
                    except (TimeoutError, httpx.HTTPError):
                        pass
                yield event

        # Runs drive the model asynchronously; the sync `Stream` is not on their path.
        self._replace(AsyncStream, "_iter_events", _iter_events)

    def _patch_component_events(self) -> None:
        from lfx.custom.custom_component.component import Component

        from runtime.token_events import TokenEvents

        process_chunk = Component._process_chunk
        send_message_event = Component._send_message_event

        async def _process_chunk(
            component: Any, chunk: str, complete_message: str, message_id: str, message: Any,
            *, first_chunk: bool = False,
        ) -> str:
            manager = component._event_manager
            if isinstance(manager, TokenEvents):
                manager.push_token(chunk)
                return complete_message + chunk
            result: str = await process_chunk(
                component, chunk, complete_message, message_id, message, first_chunk=first_chunk
            )
            return result

        async def _send_message_event(
            component: Any, message: Any, id_: str | None = None, category: str | None = None
        ) -> None:
            if isinstance(component._event_manager, TokenEvents):
                return
            await send_message_event(component, message, id_=id_, category=category)

        from lfx.graph.vertex.vertex_types import InterfaceVertex

        built_object_repr = InterfaceVertex.built_object_repr

        def _built_object_repr(vertex: Any) -> Any:
            manager = getattr(vertex.custom_component, "_event_manager", None)
            if isinstance(manager, TokenEvents):
                return ""
            return built_object_repr(vertex)  # type: ignore[no-untyped-call]

        self._replace(Component, "_process_chunk", _process_chunk)
        self._replace(Component, "_send_message_event", _send_message_event)
        self._replace(InterfaceVertex, "built_object_repr", _built_object_repr)

    def _patch_component_templates(self) -> None:
        import copy

        import lfx.custom.custom_component.component as component_module
        from pydantic import BaseModel

        copy_template = component_module._copy_component_template
        templates = self._templates

        def _copy_component_template(items: list[Any]) -> list[Any]:
            # Keyed by identity: the class-level lists live as long as their classes; the
            # list is kept in the entry so its id cannot be reused by another object.
            entry = templates.get(id(items))
            if entry is None or entry[0] is not items:
                try:
                    blob: bytes | None = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:  # anything pickle cannot copy takes the stock path
                    blob = None
                entry = templates[id(items)] = (items, blob)
            if entry[1] is None:
                copied: list[Any] = copy_template(items)
                return copied
            fresh: list[Any] = pickle.loads(entry[1])
            return fresh

        from lfx.inputs.input_mixin import BaseInputMixin
        from lfx.template.field.base import Output

        plain_deepcopy = BaseModel.__deepcopy__

        def deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
            # Only the input and output templates (`map_inputs`, `map_outputs`) take the fast
            # path, and only when their class keeps pydantic's own __deepcopy__.
            if (
                memo is None
                and isinstance(value, BaseInputMixin | Output)
                and type(value).__deepcopy__ is plain_deepcopy
            ):
                return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
            return copy.deepcopy(value, memo)

        self._replace(component_module, "_copy_component_template", _copy_component_template)
        self._replace(component_module, "deepcopy", deepcopy)

    def _patch_file_fields(self) -> None:
        from lfx.graph.vertex.param_handler import ParameterHandler

        canonical_file_fields = ParameterHandler._canonical_file_fields
        cache = self._file_fields

        def _canonical_file_fields(handler: Any) -> dict[str, dict[str, Any]]:
            code_field = handler.template_dict.get("code")
            code = code_field.get("value") if isinstance(code_field, dict) else None
            if not isinstance(code, str):
                fields: dict[str, dict[str, Any]] = canonical_file_fields(handler)
                return fields
            cached = cache.get(code)
            if cached is None:
                cached = cache[code] = canonical_file_fields(handler)
            fields = cached
            handler._canonical_file_fields_cache = fields
            return fields

        self._replace(ParameterHandler, "_canonical_file_fields", _canonical_file_fields)


def _model_key(model_class: type, parameters: dict[str, Any]) -> tuple[Any, ...] | None:
    """Equal parameters, equal key; None when a value cannot be compared safely."""
    from pydantic import SecretStr

    def frozen(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return ("secret", value.get_secret_value())
        if isinstance(value, dict):
            return ("dict", tuple(sorted((str(k), frozen(v)) for k, v in value.items())))
        if isinstance(value, list | tuple):
            return ("list", tuple(frozen(item) for item in value))
        if value is None or isinstance(value, str | int | float | bool):
            return value
        if isinstance(value, httpx.Client | httpx.AsyncClient):
            return value  # the shared clients of an endpoint, compared by identity
        raise TypeError(type(value).__name__)

    try:
        return (model_class, *sorted((name, frozen(value)) for name, value in parameters.items()))
    except TypeError:
        return None
