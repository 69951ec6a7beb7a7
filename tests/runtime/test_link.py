"""The runtime link (runtime/link.py) against the real runtime and the mock LLM."""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from uvicorn import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.typing import Subprotocol

from devstack.procs import free_port
from tests.runtime.conftest import RUN_TIMEOUT_S, TOKEN, Service, runtime_process, stream_events
from tests.runtime.test_streaming import wait_for_stats

# The numbers are the spec's, written out so that a wrong constant in runtime.link fails here.
SUBPROTOCOL = "sitekit-link.1"
OPEN, CANCEL = 1, 2
HEAD, DATA, END, GOAWAY = 1, 2, 3, 4
# The mock notices a cancelled stream at its next token (#slow: every 0.5 s). A run left
# alone would end at its deadline, which the mock also counts as cancelled: waiting for less
# than that tells the two apart.
CANCEL_SEEN_S = RUN_TIMEOUT_S / 2
RUN_HEADERS = [["authorization", f"Bearer {TOKEN}"], ["content-type", "application/json"],
               ["accept", "text/event-stream"], ["x-request-id", "link-test"]]


def connect_link(
    base_url: str, token: str | None = TOKEN, subprotocols: Sequence[str] = (SUBPROTOCOL,)
) -> connect:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return connect(
        base_url.replace("http://", "ws://", 1) + "/link",
        subprotocols=[Subprotocol(name) for name in subprotocols] or None,
        additional_headers=headers, open_timeout=10, close_timeout=5,
    )


def frame(stream_id: int, kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("!IB", stream_id, kind) + payload


def open_frame(
    stream_id: int, path: str, body: bytes, headers: list[list[str]] | None = None,
    method: str = "POST",
) -> bytes:
    head = orjson.dumps({"method": method, "path": path,
                         "headers": RUN_HEADERS if headers is None else headers})
    return frame(stream_id, OPEN, struct.pack("!H", len(head)) + head + body)


def run_frame(stream_id: int, flow_id: str, text: str, session_id: str = "session-1") -> bytes:
    body = orjson.dumps({"input_value": text, "session_id": session_id, "variables": {}})
    return open_frame(stream_id, f"/flows/{flow_id}/stream", body)


@dataclass
class LinkResponse:
    """What the link carried for one stream id."""

    kinds: list[int] = field(default_factory=list)
    status: int = 0
    headers: list[list[str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def ended(self) -> bool:
        return END in self.kinds

    def add(self, kind: int, payload: bytes) -> None:
        self.kinds.append(kind)
        if kind == HEAD:
            self.status = struct.unpack_from("!H", payload)[0]
            self.headers = orjson.loads(payload[2:])
        elif kind == DATA:
            assert payload, "a DATA frame is never empty"
            self.body += payload

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for block in self.body.decode().split("\n\n"):
            if block:
                fields = dict(line.split(": ", 1) for line in block.split("\n"))
                found.append((fields["event"], json.loads(fields["data"])))
        return found


async def recv_frame(ws: ClientConnection) -> tuple[int, int, bytes]:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, bytes), "the runtime sends binary messages only"
    stream_id, kind = struct.unpack_from("!IB", message)
    return stream_id, kind, message[5:]


async def read_until_ended(
    ws: ClientConnection, ids: set[int], responses: dict[int, LinkResponse] | None = None,
) -> dict[int, LinkResponse]:
    """Every frame, by stream id, until each of `ids` has ended."""
    responses = {} if responses is None else responses
    while not all(i in responses and responses[i].ended for i in ids):
        stream_id, kind, payload = await recv_frame(ws)
        responses.setdefault(stream_id, LinkResponse()).add(kind, payload)
    return responses


async def read_first_data(ws: ClientConnection, stream_id: int) -> LinkResponse:
    response = LinkResponse()
    while DATA not in response.kinds:
        got_id, kind, payload = await recv_frame(ws)
        assert got_id == stream_id
        response.add(kind, payload)
    return response


def ok_run(response: LinkResponse) -> list[tuple[str, dict[str, Any]]]:
    assert response.status == 200
    assert response.kinds[0] == HEAD and response.kinds[-1] == END
    assert set(response.kinds[1:-1]) == {DATA}
    return response.events()


async def test_a_run_over_the_link_is_the_run_over_http(
    runtime: httpx.AsyncClient, runtime_service: Service, deployed: str
) -> None:
    question = "#tokens=7 where is my parcel"
    over_http = await stream_events(runtime, deployed, question, session_id="s-link")
    async with connect_link(runtime_service.url) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        await ws.send(run_frame(1, deployed, question, session_id="s-link"))
        response = (await read_until_ended(ws, {1}))[1]
    events = ok_run(response)
    assert dict(response.headers)["content-type"].startswith("text/event-stream")
    assert [name for name, _ in events] == ["token"] * 7 + ["end"]
    assert events == over_http


async def test_two_runs_on_one_link_are_served_at_once(
    runtime_service: Service, deployed: str
) -> None:
    async with connect_link(runtime_service.url) as ws:
        await ws.send(run_frame(1, deployed, "#slow #tokens=3 first", session_id="s-first"))
        await ws.send(run_frame(2, deployed, "#tokens=5 second", session_id="s-second"))
        order: list[int] = []
        responses: dict[int, LinkResponse] = {}
        while len(order) < 2:
            stream_id, kind, payload = await recv_frame(ws)
            responses.setdefault(stream_id, LinkResponse()).add(kind, payload)
            if kind == END:
                order.append(stream_id)
    assert order == [2, 1], "the fast run opened second must not wait for the slow one"
    first, second = ok_run(responses[1]), ok_run(responses[2])
    assert len(first) == 4 and first[-1][0] == "end"
    assert first[-1][1]["session_id"] == "s-first"
    assert len(second) == 6 and second[-1][0] == "end"
    assert second[-1][1]["session_id"] == "s-second"


async def test_cancel_stops_the_run(
    runtime_service: Service, deployed: str, mock_client: httpx.AsyncClient
) -> None:
    before = (await mock_client.get("/_stats")).json()
    marker = uuid.uuid4().hex
    async with connect_link(runtime_service.url) as ws:
        await ws.send(run_frame(1, deployed, f"#slow #tokens=40 {marker}"))
        await read_first_data(ws, 1)
        await ws.send(frame(1, CANCEL))
        stats = await wait_for_stats(
            mock_client, lambda s: s["streams_cancelled"] > before["streams_cancelled"],
            CANCEL_SEEN_S,
        )
        await ws.send(frame(99, CANCEL))  # not open: ignored
        await ws.send(run_frame(2, deployed, "#tokens=2 still here"))
        responses = await read_until_ended(ws, {2})
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 1
    assert any(marker in message for message in stats["last_user_messages"])
    assert stats["streams_completed"] == before["streams_completed"]
    assert END not in responses.get(1, LinkResponse()).kinds
    assert ok_run(responses[2])[-1][0] == "end"


async def test_an_unknown_flow_is_the_runtimes_404(
    runtime: httpx.AsyncClient, runtime_service: Service
) -> None:
    body = orjson.dumps({"input_value": "hello", "session_id": "s", "variables": {}})
    over_http = await runtime.post("/flows/no-such-flow/stream", content=body)
    async with connect_link(runtime_service.url) as ws:
        await ws.send(open_frame(1, "/flows/no-such-flow/stream", body))
        response = (await read_until_ended(ws, {1}))[1]
    assert response.kinds == [HEAD, DATA, END]
    assert response.status == over_http.status_code == 404
    assert dict(response.headers)["content-type"] == "application/json"
    assert orjson.loads(response.body) == over_http.json()
    assert over_http.json()["error"]["code"] == "flow_not_found"


async def test_the_rest_of_the_api_works_over_the_link(
    runtime_service: Service, demo_flow: dict[str, Any]
) -> None:
    flow_id = f"link-{uuid.uuid4().hex[:8]}"
    deploy = orjson.dumps({"version": 3, "flow": demo_flow})
    async with connect_link(runtime_service.url) as ws:
        requests = [("PUT", f"/flows/{flow_id}", deploy), ("GET", "/flows?the=query", b""),
                    ("DELETE", f"/flows/{flow_id}", b"")]
        responses: dict[int, LinkResponse] = {}
        for stream_id, (method, path, body) in enumerate(requests, start=1):
            await ws.send(open_frame(stream_id, path, body, method=method))
            await read_until_ended(ws, {stream_id}, responses)
    assert responses[1].status == 200
    assert orjson.loads(responses[1].body) == {"flow_id": flow_id, "version": 3}
    assert responses[2].status == 200
    assert {"flow_id": flow_id, "version": 3} in orjson.loads(responses[2].body)["flows"]
    assert responses[3].status == 204 and responses[3].kinds == [HEAD, END]


@pytest.mark.parametrize(("token", "subprotocols"), [
    ("not-the-service-token-at-all", [SUBPROTOCOL]),
    (None, [SUBPROTOCOL]),
    (TOKEN, []),
    (TOKEN, ["sitekit-link.2"]),
], ids=["bad-token", "no-token", "no-subprotocol", "other-subprotocol"])
async def test_the_handshake_needs_the_token_and_the_subprotocol(
    runtime_service: Service, token: str | None, subprotocols: list[str]
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect_link(runtime_service.url, token, subprotocols):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("headers", [
    [["content-type", "application/json"]],
    [["authorization", "Bearer not-the-service-token"], ["content-type", "application/json"]],
], ids=["no-token", "bad-token"])
async def test_a_request_on_the_link_needs_its_own_token(
    runtime_service: Service, deployed: str, headers: list[list[str]]
) -> None:
    body = orjson.dumps({"input_value": "hello", "session_id": "s", "variables": {}})
    async with connect_link(runtime_service.url) as ws:
        await ws.send(open_frame(1, f"/flows/{deployed}/stream", body, headers))
        response = (await read_until_ended(ws, {1}))[1]
    assert response.status == 401
    assert response.kinds == [HEAD, DATA, END]
    assert orjson.loads(response.body)["error"]["code"] == "unauthorized"


def _head(head: bytes) -> bytes:
    return struct.pack("!H", len(head)) + head


@pytest.mark.parametrize(("message", "reason"), [
    ("a text message", "text"),
    (b"\x00\x00\x01", "3 bytes"),
    (frame(1, 9), "kind 9"),
    (frame(1, 3), "kind 3"),
    (open_frame(0, "/healthz", b"", method="GET"), "stream 0"),
    (frame(1, OPEN, b"\x00"), "head length"),
    (frame(1, OPEN, struct.pack("!H", 500) + b"{}"), "head_len"),
    (frame(1, OPEN, _head(b"not json")), "head"),
    (frame(1, OPEN, _head(b'{"method": "GET", "path": "/healthz"}')), "head"),
    (frame(1, OPEN, _head(b'{"method": "GET", "path": "/healthz", "headers": ["ab"]}')), "head"),
], ids=["text", "short", "unknown-kind", "runtime-kind", "stream-0", "no-head-length",
        "head-past-end", "head-not-json", "head-without-headers", "header-not-a-pair"])
async def test_a_protocol_error_closes_the_link_with_1002(
    runtime_service: Service, message: str | bytes, reason: str
) -> None:
    async with connect_link(runtime_service.url) as ws:
        await ws.send(message)
        with pytest.raises(ConnectionClosed):
            await recv_frame(ws)
    assert ws.close_code == 1002
    assert ws.close_reason is not None and reason in ws.close_reason


async def test_an_open_for_an_open_id_closes_the_link_and_cancels_its_run(
    runtime_service: Service, deployed: str, mock_client: httpx.AsyncClient
) -> None:
    before = (await mock_client.get("/_stats")).json()
    async with connect_link(runtime_service.url) as ws:
        await ws.send(run_frame(1, deployed, "#slow #tokens=40 the first one"))
        await read_first_data(ws, 1)
        await ws.send(run_frame(1, deployed, "#tokens=2 the same id again"))
        with pytest.raises(ConnectionClosed):
            while True:
                await recv_frame(ws)
    assert ws.close_code == 1002
    assert ws.close_reason is not None and "open" in ws.close_reason
    stats = await wait_for_stats(
        mock_client, lambda s: s["streams_cancelled"] > before["streams_cancelled"], CANCEL_SEEN_S
    )
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 1


async def test_closing_the_link_cancels_its_runs(
    runtime_service: Service, deployed: str, mock_client: httpx.AsyncClient
) -> None:
    before = (await mock_client.get("/_stats")).json()
    markers = [uuid.uuid4().hex, uuid.uuid4().hex]
    async with connect_link(runtime_service.url) as ws:
        for stream_id, marker in enumerate(markers, start=1):
            await ws.send(run_frame(stream_id, deployed, f"#slow #tokens=40 {marker}"))
        responses: dict[int, LinkResponse] = {}
        while not all(DATA in responses.get(i, LinkResponse()).kinds for i in (1, 2)):
            stream_id, kind, payload = await recv_frame(ws)
            responses.setdefault(stream_id, LinkResponse()).add(kind, payload)
    stats = await wait_for_stats(
        mock_client, lambda s: s["streams_cancelled"] >= before["streams_cancelled"] + 2,
        CANCEL_SEEN_S,
    )
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 2
    for marker in markers:
        assert any(marker in message for message in stats["last_user_messages"])
    assert stats["streams_completed"] == before["streams_completed"]


async def test_on_sigterm_the_link_drains_then_closes_with_1001(
    stack_dir: Path, mock_llm: Service, demo_flow: dict[str, Any]
) -> None:
    port = free_port()
    process = runtime_process("runtime-drain", port, stack_dir / "runtime-drain",
                              stack_dir / "runtime-drain" / "flows", mock_llm.url)
    process.start()
    try:
        process.wait_ready(120)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as client:
            deploy = {"version": 1, "flow": demo_flow}
            assert (await client.put("/flows/drain", json=deploy)).status_code == 200
        responses: dict[int, LinkResponse] = {}
        seen: list[tuple[int, int]] = []
        async with connect_link(url) as ws:
            await ws.send(run_frame(1, "drain", "#slow #tokens=4 finish me"))
            responses[1] = await read_first_data(ws, 1)
            process.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosedOK):
                while True:
                    stream_id, kind, payload = await recv_frame(ws)
                    seen.append((stream_id, kind))
                    if (stream_id, kind) == (0, GOAWAY):
                        assert payload == b""
                        await ws.send(run_frame(2, "drain", "#tokens=2 too late"))
                        continue
                    responses.setdefault(stream_id, LinkResponse()).add(kind, payload)
        assert ws.close_code == 1001
        assert seen[0] == (0, GOAWAY)
        refused = responses[2]
        assert refused.kinds == [HEAD, DATA, END] and refused.status == 503
        assert orjson.loads(refused.body) == {
            "error": {"code": "unavailable", "message": "the runtime is shutting down"}
        }
        events = ok_run(responses[1])
        assert [name for name, _ in events] == ["token"] * 4 + ["end"]
        assert seen.index((1, END)) > 0
        # uvicorn re-raises the SIGTERM it handled once it has shut down.
        assert process.popen is not None
        assert process.popen.wait(15) in (0, -signal.SIGTERM)
    finally:
        process.stop()


async def test_uvicorn_still_has_the_protocol_state_the_drain_reads() -> None:
    """runtime.server's LinkWebSocketProtocol reads these; a new uvicorn must keep them."""

    async def no_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = Config(app=no_app, ws="websockets-sansio", log_config=None)
    config.load()
    protocol = WebSocketsSansIOProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    assert isinstance(protocol.queue, asyncio.Queue)
    assert protocol.handshake_complete is False and protocol.close_sent is False
