-- Organisations, users and their tokens; seller agents and their versions; orders, the buyer's
-- agent configs and the provisioning outbox; usage; the audit log.
-- Ids are UUIDv7 (time-ordered), so keyset pagination by id lists oldest first.

CREATE TABLE organisations (
    org_id      uuid PRIMARY KEY,
    name        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('provider', 'customer', 'both')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    user_id     uuid PRIMARY KEY,
    email       text NOT NULL,
    name        text NOT NULL DEFAULT '',
    is_staff    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE memberships (
    org_id      uuid NOT NULL REFERENCES organisations (org_id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, org_id)
);
CREATE INDEX memberships_org ON memberships (org_id, user_id);

-- Bearer tokens of users: only a SHA-256 of the token is kept.
CREATE TABLE user_tokens (
    token_id     uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    token_hash   bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    name         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX user_tokens_user ON user_tokens (user_id, token_id);

-- A seller's agent. Its flow lives in immutable versions; `current_version` is what new
-- orders get.
CREATE TABLE provider_agents (
    provider_agent_id  uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES organisations (org_id),
    name               text NOT NULL,
    description        text NOT NULL DEFAULT '',
    published          boolean NOT NULL DEFAULT false,
    price              jsonb NOT NULL,
    limits             jsonb NOT NULL,
    current_version    integer NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_agents_org ON provider_agents (org_id, provider_agent_id);
CREATE INDEX provider_agents_published ON provider_agents (provider_agent_id) WHERE published;

CREATE TABLE provider_agent_versions (
    provider_agent_id  uuid NOT NULL REFERENCES provider_agents (provider_agent_id),
    version            integer NOT NULL,
    flow               jsonb NOT NULL,
    stripped_secrets   text[] NOT NULL DEFAULT '{}',
    warnings           text[] NOT NULL DEFAULT '{}',
    created_by         uuid REFERENCES users (user_id),
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_agent_id, version)
);

CREATE TABLE orders (
    order_id           uuid PRIMARY KEY,
    customer_org_id    uuid NOT NULL REFERENCES organisations (org_id),
    provider_agent_id  uuid NOT NULL REFERENCES provider_agents (provider_agent_id),
    flow_version       integer NOT NULL,
    status             text NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    created_by         uuid REFERENCES users (user_id),
    created_at         timestamptz NOT NULL DEFAULT now(),
    approved_at        timestamptz
);
CREATE INDEX orders_customer ON orders (customer_org_id, order_id);

-- Webhook deliveries seen, by the signed event id: a replay is answered, never applied twice.
CREATE TABLE webhook_deliveries (
    delivery_id   text PRIMARY KEY,
    order_id      uuid NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);

-- The buyer's instance of an agent (one per approved order). `agent_id` is the id the
-- gateway routes by; `agent_instances` holds the registry's copy once it is provisioned.
CREATE TABLE customer_agent_configs (
    agent_id           uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL REFERENCES organisations (org_id),
    order_id           uuid NOT NULL UNIQUE REFERENCES orders (order_id),
    provider_agent_id  uuid NOT NULL REFERENCES provider_agents (provider_agent_id),
    flow_version       integer NOT NULL,
    display_name       text NOT NULL,
    greeting           text NOT NULL DEFAULT '',
    theme              jsonb NOT NULL DEFAULT '{}',
    starter_prompts    text[] NOT NULL DEFAULT '{}',
    allowed_origins    text[] NOT NULL DEFAULT '{}',
    plan               text NOT NULL DEFAULT 'standard',
    limits             jsonb NOT NULL,
    suspended          boolean NOT NULL DEFAULT false,
    provisioning       text NOT NULL DEFAULT 'pending'
                       CHECK (provisioning IN ('pending', 'provisioning', 'active', 'failed')),
    failure_reason     text,
    runtime_url        text,
    flow_id            text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customer_agent_configs_tenant ON customer_agent_configs (tenant_id, agent_id);
CREATE INDEX customer_agent_configs_provider
    ON customer_agent_configs (provider_agent_id, agent_id);

-- Work that must happen after a commit (deploying to the runtime), with bounded retries.
CREATE TABLE outbox (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL,
    subject_id      uuid NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    done_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE done_at IS NULL;

-- One row per usage event (the gateway's request id), filled by the usage consumer.
CREATE TABLE usage_events (
    event_id       uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL,
    agent_id       uuid NOT NULL,
    key_id         uuid,
    session_id     text,
    status         text NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    input_tokens   integer NOT NULL DEFAULT 0,
    output_tokens  integer NOT NULL DEFAULT 0,
    duration_ms    integer NOT NULL DEFAULT 0,
    ttft_ms        integer,
    occurred_at    timestamptz NOT NULL
);
CREATE INDEX usage_events_agent_time ON usage_events (agent_id, occurred_at);

-- Per agent instance per day, kept by a trigger so the usage views read a few rows a day
-- whatever the number of events.
CREATE TABLE usage_daily (
    agent_id       uuid NOT NULL,
    day            date NOT NULL,
    tenant_id      uuid NOT NULL,
    requests       bigint NOT NULL DEFAULT 0,
    completed      bigint NOT NULL DEFAULT 0,
    failed         bigint NOT NULL DEFAULT 0,
    cancelled      bigint NOT NULL DEFAULT 0,
    input_tokens   bigint NOT NULL DEFAULT 0,
    output_tokens  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, day)
);
CREATE INDEX usage_daily_tenant ON usage_daily (tenant_id, day, agent_id);

CREATE FUNCTION usage_daily_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (agent_id, day, tenant_id, requests, completed, failed,
                                  cancelled, input_tokens, output_tokens)
    VALUES (NEW.agent_id, (NEW.occurred_at AT TIME ZONE 'UTC')::date, NEW.tenant_id, 1,
            (NEW.status = 'completed')::int, (NEW.status = 'failed')::int,
            (NEW.status = 'cancelled')::int, NEW.input_tokens, NEW.output_tokens)
    ON CONFLICT (agent_id, day) DO UPDATE SET
        requests = d.requests + 1,
        completed = d.completed + EXCLUDED.completed,
        failed = d.failed + EXCLUDED.failed,
        cancelled = d.cancelled + EXCLUDED.cancelled,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens;
    RETURN NULL;
END $$;

CREATE TRIGGER usage_events_daily AFTER INSERT ON usage_events
    FOR EACH ROW EXECUTE FUNCTION usage_daily_add();

-- Who did what to which object. `org_id` is the organisation that owns the object.
CREATE TABLE audit_log (
    audit_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    actor_user_id  uuid,
    org_id         uuid,
    action         text NOT NULL,
    object_type    text NOT NULL,
    object_id      text NOT NULL,
    details        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_org ON audit_log (org_id, audit_id);
