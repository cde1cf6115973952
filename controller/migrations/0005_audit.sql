-- The audit log: every change and every refused authentication, with the
-- real reason. Append-only; old records go by retention
-- (`audit_retention_days`). Never holds a secret.
CREATE TABLE audit_log (
    id       TEXT PRIMARY KEY NOT NULL,
    at_ms    BIGINT NOT NULL,
    subject  TEXT NOT NULL,
    action   TEXT NOT NULL,
    resource TEXT NOT NULL,
    result   TEXT NOT NULL,
    reason   TEXT NULL,
    source   TEXT NULL
);
CREATE INDEX audit_log_at ON audit_log (at_ms);
