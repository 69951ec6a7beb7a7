"""The retrieval flow: the runtime answers from the collection the request names, read from the
CMP's database through our installed Tenant Documents component, and from no other."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from cmp import documents
from cmp.embeddings import EmbeddingsClient
from cmp.ids import uuid7
from cmp.wire import collection_name
from devstack.procs import free_port
from tests.runtime.conftest import ROOT, TOKEN, Service, runtime_process, stream_events

RETRIEVAL_FLOW = ROOT / "runtime/flows/retrieval.json"
NODE = "TenantDocuments-sk005"


@pytest.fixture(scope="module")
async def documents_db(postgres_server: Any, migrated_template: str) -> str:
    """A migrated database of the CMP's schema that the runtime below reads documents from."""
    name = f"sitekit_docs_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(postgres_server.get_uri())
    await conn.execute(f"CREATE DATABASE {name} TEMPLATE {migrated_template}")
    await conn.close()
    return str(postgres_server.get_uri(name))


@pytest.fixture(scope="module")
def documents_runtime(
    stack_dir: Path, mock_llm: Service, documents_db: str
) -> Iterator[Service]:
    port = free_port()
    process = runtime_process(
        "runtime-documents", port, stack_dir / "runtime-documents",
        stack_dir / "runtime-documents" / "flows", mock_llm.url,
    )
    process.env = {**process.env, "RUNTIME_VECTORS_DATABASE_URL": documents_db}
    process.start()
    process.wait_ready(120)
    yield Service(process, f"http://127.0.0.1:{port}")
    process.stop()


@pytest.fixture
async def client(documents_runtime: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=documents_runtime.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as http:
        yield http


@pytest.fixture
def retrieval_flow() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(RETRIEVAL_FLOW.read_text())
    return loaded


@pytest.fixture
async def deployed_retrieval(
    client: httpx.AsyncClient, retrieval_flow: dict[str, Any]
) -> AsyncIterator[str]:
    flow_id = f"retrieval-{uuid.uuid4().hex[:10]}"
    response = await client.put(f"/flows/{flow_id}", json={"version": 1, "flow": retrieval_flow})
    assert response.status_code == 200, response.text
    yield flow_id
    await client.delete(f"/flows/{flow_id}")


@pytest.fixture
async def db(documents_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(documents_db)
    yield conn
    await conn.close()


async def tenant_agent(db: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """A customer organisation with one agent instance (rows only, as provisioning leaves them)."""
    tenant_id, provider_id, agent_id = uuid7(), uuid7(), uuid7()
    provider_agent_id, order_id = uuid7(), uuid7()
    limits = orjson.dumps({"tenant": {"rate": 5, "burst": 5}, "key": {"rate": 5, "burst": 5}})
    await db.execute("INSERT INTO organisations (org_id, name, kind) VALUES"
                     " ($1, 'Tenant', 'customer'), ($2, 'Seller', 'provider')",
                     tenant_id, provider_id)
    await db.execute("INSERT INTO provider_agents (provider_agent_id, org_id, name, price, limits)"
                     " VALUES ($1, $2, 'Helper', '{}', $3)",
                     provider_agent_id, provider_id, limits.decode())
    await db.execute("INSERT INTO orders (order_id, customer_org_id, provider_agent_id,"
                     " flow_version, status) VALUES ($1, $2, $3, 1, 'approved')",
                     order_id, tenant_id, provider_agent_id)
    await db.execute("INSERT INTO customer_agent_configs (agent_id, tenant_id, order_id,"
                     " provider_agent_id, flow_version, display_name, limits)"
                     " VALUES ($1, $2, $3, $4, 1, 'Helper', $5)",
                     agent_id, tenant_id, order_id, provider_agent_id, limits.decode())
    return tenant_id, agent_id


async def store_document(
    db: asyncpg.Connection, llm_url: str, tenant_id: uuid.UUID, agent_id: uuid.UUID, text: str
) -> None:
    """What an upload to the CMP stores: the document, its chunks and their vectors."""
    embeddings = EmbeddingsClient(f"{llm_url}/v1", "sk-test", "text-embedding-mock")
    try:
        chunks = documents.chunk_text(text)
        vectors = await embeddings.embed(chunks)
    finally:
        await embeddings.aclose()
    document_id = uuid7()
    async with db.transaction():
        await db.execute(
            "INSERT INTO training_documents (document_id, tenant_id, agent_id, filename,"
            " media_type, bytes, content, status, chunk_count)"
            " VALUES ($1, $2, $3, 'policy.md', 'text/markdown', $4, $5, 'ready', $6)",
            document_id, tenant_id, agent_id, len(text.encode()), text, len(chunks),
        )
        table = await documents.collection_table(
            db, tenant_id, agent_id, "text-embedding-mock", len(vectors[0])
        )
        await documents.store_chunks(db, table, document_id, chunks, vectors)


def variables(tenant_id: uuid.UUID, agent_id: uuid.UUID) -> dict[str, str]:
    """What the gateway sends with every run (gateway/relay.py)."""
    return {"tenant_id": str(tenant_id), "agent_id": str(agent_id),
            "collection": collection_name(str(tenant_id), str(agent_id)), "request_id": "r-1"}


async def answer(client: httpx.AsyncClient, flow_id: str, text: str,
                 run_variables: dict[str, str]) -> tuple[str, dict[str, Any]]:
    events = await stream_events(client, flow_id, text, variables=run_variables)
    kind, data = events[-1]
    return kind, data


async def test_each_tenant_is_answered_from_its_own_collection(
    client: httpx.AsyncClient, deployed_retrieval: str, db: asyncpg.Connection,
    mock_llm: Service,
) -> None:
    alice, bob = await tenant_agent(db), await tenant_agent(db)
    await store_document(db, mock_llm.url, *alice,
                         "# Refunds\n\nRefunds are paid within fourteen days. Ask for Marigold.\n\n"
                         "# Opening hours\n\nThe shop opens at nine.")
    await store_document(db, mock_llm.url, *bob,
                         "# Refunds\n\nRefunds are paid within thirty days. Ask for Zebulon.")
    question = "#echo How many days until refunds are paid?"

    kind, data = await answer(client, deployed_retrieval, question, variables(*alice))
    assert kind == "end", data
    prompt = data["text"]  # the mock echoed the prompt the flow built
    assert "Documents: # Refunds Refunds are paid within fourteen days. Ask for Marigold." in prompt
    assert "Question: How many days until refunds are paid?" in prompt
    assert "thirty" not in prompt and "Zebulon" not in prompt

    kind, data = await answer(client, deployed_retrieval, question, variables(*bob))
    assert kind == "end", data
    assert "thirty days. Ask for Zebulon." in data["text"]
    assert "fourteen" not in data["text"] and "Marigold" not in data["text"]


async def test_an_agent_without_documents_gets_an_empty_context(
    client: httpx.AsyncClient, deployed_retrieval: str, db: asyncpg.Connection,
    mock_llm: Service,
) -> None:
    alice, newcomer = await tenant_agent(db), await tenant_agent(db)
    await store_document(db, mock_llm.url, *alice, "Refunds are paid within fourteen days.")
    kind, data = await answer(client, deployed_retrieval, "#echo Refunds?", variables(*newcomer))
    assert kind == "end", data
    assert "Documents: Question: Refunds?" in data["text"]


@pytest.mark.parametrize("collection", [None, "", "tenant_1_agent_2", "public.users; --"])
async def test_a_missing_or_malformed_collection_fails_the_run(
    client: httpx.AsyncClient, deployed_retrieval: str, collection: str | None
) -> None:
    run_variables = {"tenant_id": "t", "agent_id": "a"}
    if collection is not None:
        run_variables["collection"] = collection
    kind, data = await answer(client, deployed_retrieval, "Refunds?", run_variables)
    assert kind == "error"
    assert data["code"] == "runtime_error" and "collection" in data["message"]


async def test_a_runtime_without_a_documents_database_refuses_to_retrieve(
    runtime: httpx.AsyncClient, retrieval_flow: dict[str, Any]
) -> None:
    """The component is installed everywhere; it reads documents only where configured."""
    flow_id = f"retrieval-{uuid.uuid4().hex[:10]}"
    deployed = await runtime.put(f"/flows/{flow_id}", json={"version": 1, "flow": retrieval_flow})
    assert deployed.status_code == 200, deployed.text
    try:
        tenant, agent = uuid.uuid4(), uuid.uuid4()
        kind, data = await answer(runtime, flow_id, "Refunds?", variables(tenant, agent))
    finally:
        await runtime.delete(f"/flows/{flow_id}")
    assert kind == "error" and "no documents database" in data["message"]


async def test_altered_retriever_code_is_refused_naming_the_node(
    client: httpx.AsyncClient, retrieval_flow: dict[str, Any]
) -> None:
    flow = copy.deepcopy(retrieval_flow)
    [node] = [n for n in flow["data"]["nodes"] if n["id"] == NODE]
    code = node["data"]["node"]["template"]["code"]
    code["value"] = code["value"].replace(
        'context.get("request_variables") or {}', '{"collection": "tenant_other"}'
    )
    response = await client.put("/flows/tampered", json={"version": 1, "flow": flow})
    assert response.status_code == 422
    assert NODE in response.json()["error"]["message"]


def test_retrieval_json_is_what_the_builder_builds(retrieval_flow: dict[str, Any]) -> None:
    script = ("import json, sys\nfrom runtime.flows.build_retrieval import build_flow\n"
              "json.dump(build_flow(), sys.stdout)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          check=True, timeout=180)
    assert json.loads(done.stdout) == retrieval_flow, "run python -m runtime.flows.build_retrieval"


def test_runtime_settings_for_documents() -> None:
    from runtime.config import ConfigError, RuntimeConfig

    base = {"RUNTIME_SERVICE_TOKEN": TOKEN, "RUNTIME_LLM_BASE_URL": "http://llm:1/v1",
            "RUNTIME_LLM_API_KEY": "sk-llm"}
    config = RuntimeConfig.from_env(base)
    assert config.vectors_database_url == ""
    assert (config.embeddings_url, config.embeddings_api_key) == ("http://llm:1/v1", "sk-llm")
    config = RuntimeConfig.from_env({**base, "RUNTIME_VECTORS_DATABASE_URL": "postgresql://db/x",
                                     "RUNTIME_EMBEDDINGS_URL": "http://emb:2/v1/",
                                     "RUNTIME_EMBEDDINGS_MODEL": "text-embedding-3-small"})
    assert config.vectors_database_url == "postgresql://db/x"
    assert (config.embeddings_url, config.embeddings_model) == (
        "http://emb:2/v1", "text-embedding-3-small")
    with pytest.raises(ConfigError, match="RUNTIME_VECTORS_DATABASE_URL"):
        RuntimeConfig.from_env({**base, "RUNTIME_VECTORS_DATABASE_URL": "mysql://db/x"})
