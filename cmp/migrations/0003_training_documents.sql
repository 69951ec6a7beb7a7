-- Training documents of a buyer's agent instance and the vector collections their chunks live in.
--
-- Each agent instance's collection (`tenant_{tenant_id}_agent_{agent_id}` on the wire) is its own
-- table in the `collections` schema, made on the first upload with the dimension of the
-- embeddings model then in use and its own HNSW index: a search reads one tenant's table only,
-- and the index never has to filter other tenants' rows out of its candidates. The wire name
-- is longer than PostgreSQL's 63-character identifiers, so `vector_collections` maps it to the
-- table.

CREATE SCHEMA IF NOT EXISTS collections;

CREATE TABLE training_documents (
    document_id     uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES organisations (org_id),
    agent_id        uuid NOT NULL REFERENCES customer_agent_configs (agent_id) ON DELETE CASCADE,
    filename        text NOT NULL,
    media_type      text NOT NULL
                    CHECK (media_type IN ('text/plain', 'text/markdown', 'application/pdf')),
    bytes           integer NOT NULL,
    -- The extracted text, kept so a failed embedding can be retried without a new upload.
    content         text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'ready', 'failed')),
    failure_reason  text,
    chunk_count     integer NOT NULL DEFAULT 0,
    created_by      uuid REFERENCES users (user_id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX training_documents_tenant ON training_documents (tenant_id, document_id);
CREATE INDEX training_documents_agent ON training_documents (agent_id, document_id);

CREATE TABLE vector_collections (
    collection   text PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES organisations (org_id),
    agent_id     uuid NOT NULL UNIQUE
                 REFERENCES customer_agent_configs (agent_id) ON DELETE CASCADE,
    table_name   text NOT NULL UNIQUE CHECK (table_name ~ '^agent_[0-9a-f]{32}$'),
    model        text NOT NULL,
    dimensions   integer NOT NULL CHECK (dimensions BETWEEN 1 AND 2000),
    created_at   timestamptz NOT NULL DEFAULT now()
);
