-- Usage per seller agent per day, kept by the same trigger as usage_daily, so a seller's view
-- reads one row per agent per day however many buyers' instances it has.

CREATE TABLE usage_daily_by_agent (
    provider_agent_id  uuid NOT NULL,
    day                date NOT NULL,
    org_id             uuid NOT NULL,
    instances          bigint NOT NULL DEFAULT 0,
    requests           bigint NOT NULL DEFAULT 0,
    completed          bigint NOT NULL DEFAULT 0,
    failed             bigint NOT NULL DEFAULT 0,
    cancelled          bigint NOT NULL DEFAULT 0,
    input_tokens       bigint NOT NULL DEFAULT 0,
    output_tokens      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (provider_agent_id, day)
);
CREATE INDEX usage_daily_by_agent_org ON usage_daily_by_agent (org_id, day, provider_agent_id);

CREATE OR REPLACE FUNCTION usage_daily_add() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    first_today boolean;
    seller_agent uuid;
    seller_org uuid;
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
        output_tokens = d.output_tokens + EXCLUDED.output_tokens
    RETURNING (xmax = 0) INTO first_today;

    SELECT c.provider_agent_id, p.org_id INTO seller_agent, seller_org
    FROM customer_agent_configs c JOIN provider_agents p USING (provider_agent_id)
    WHERE c.agent_id = NEW.agent_id;
    IF seller_agent IS NOT NULL THEN
        INSERT INTO usage_daily_by_agent AS a (provider_agent_id, day, org_id, instances,
                                               requests, completed, failed, cancelled,
                                               input_tokens, output_tokens)
        VALUES (seller_agent, (NEW.occurred_at AT TIME ZONE 'UTC')::date, seller_org, 1, 1,
                (NEW.status = 'completed')::int, (NEW.status = 'failed')::int,
                (NEW.status = 'cancelled')::int, NEW.input_tokens, NEW.output_tokens)
        ON CONFLICT (provider_agent_id, day) DO UPDATE SET
            instances = a.instances + first_today::int,
            requests = a.requests + 1,
            completed = a.completed + EXCLUDED.completed,
            failed = a.failed + EXCLUDED.failed,
            cancelled = a.cancelled + EXCLUDED.cancelled,
            input_tokens = a.input_tokens + EXCLUDED.input_tokens,
            output_tokens = a.output_tokens + EXCLUDED.output_tokens;
    END IF;
    RETURN NULL;
END $$;
