-- Roles and role bindings (Kubernetes style): users and service accounts
-- hold API tokens; bindings give them roles; a role's rules name resources
-- and verbs. Deny by default. The four built-in roles live in code.
CREATE TABLE principals (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);

ALTER TABLE api_tokens ADD COLUMN id TEXT NULL;
ALTER TABLE api_tokens ADD COLUMN subject_kind TEXT NOT NULL DEFAULT 'user';
ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT NULL;
ALTER TABLE api_tokens ADD COLUMN revoked_at BIGINT NULL;
UPDATE api_tokens SET id = substr(hash, 1, 16);
INSERT INTO principals (kind, name, created_at)
    SELECT 'user', name, MIN(created_at) FROM api_tokens GROUP BY name;

CREATE TABLE roles (
    name       TEXT PRIMARY KEY NOT NULL,
    rules      TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE role_bindings (
    name         TEXT PRIMARY KEY NOT NULL,
    role         TEXT NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_name TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX role_bindings_subject ON role_bindings (subject_kind, subject_name);

-- The admin user of a controller initialised before roles existed keeps
-- its rights.
INSERT INTO role_bindings (name, role, subject_kind, subject_name, created_at)
    SELECT 'admin', 'admin', 'user', 'admin', created_at FROM principals
    WHERE kind = 'user' AND name = 'admin';
