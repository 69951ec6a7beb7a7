-- Signing keys, API keys and agent instances: what the gateway needs from the control plane.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE signing_keys (
    kid          text PRIMARY KEY,
    private_pem  text NOT NULL,
    public_jwk   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- the newest unretired key signs; retired keys stay published until dropped from the JWKS
    retired_at   timestamptz
);

CREATE TABLE agent_instances (
    agent_id         uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL,
    name             text NOT NULL,
    status           text NOT NULL CHECK (status IN ('active', 'suspended')),
    runtime_url      text NOT NULL,
    flow_id          text NOT NULL,
    flow_version     integer NOT NULL,
    limits           jsonb NOT NULL,
    allowed_origins  text[] NOT NULL DEFAULT '{}',
    widget           jsonb NOT NULL DEFAULT '{}',
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_instances_tenant ON agent_instances (tenant_id, agent_id);

CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    agent_id     uuid NOT NULL REFERENCES agent_instances (agent_id),
    kind         text NOT NULL CHECK (kind IN ('secret', 'publishable')),
    prefix       text NOT NULL,
    origins      text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    CHECK (kind = 'secret' OR cardinality(origins) > 0)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, key_id);
