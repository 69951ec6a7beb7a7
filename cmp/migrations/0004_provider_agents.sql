-- A provider agent's versions are immutable: an order pins a version, and what a buyer was
-- sold must not change under them. A change is a new version, never an UPDATE.

CREATE FUNCTION provider_agent_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'provider agent versions are immutable; create a new version'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER provider_agent_versions_no_update BEFORE UPDATE ON provider_agent_versions
    FOR EACH ROW EXECUTE FUNCTION provider_agent_versions_immutable();
