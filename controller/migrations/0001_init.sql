--sqlite: -- comsat controller schema, version 1 (SQLite).
--sqlite: --
--sqlite: -- Times are Unix seconds. Ids and keys are lowercase hex. The PostgreSQL
--sqlite: -- schema mirrors this one in its own migration directory.
--postgres: -- comsat controller schema, version 1 (PostgreSQL). Mirrors
--postgres: -- ../sqlite/0001_init.sql: times are Unix seconds, ids and keys lowercase
--postgres: -- hex. Only portable SQL (no sequences, advisory locks or extensions), so
--postgres: -- it also runs on CockroachDB and YugabyteDB.

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    secret_hash TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE nodes (
    node_id        TEXT PRIMARY KEY NOT NULL,
    kind           TEXT NOT NULL,
    name           TEXT NOT NULL,
    sign_pub       TEXT NOT NULL,
    noise_pub      TEXT NULL,
    public_addr    TEXT NULL,
    created_at     BIGINT NOT NULL,
    last_seen      BIGINT NULL,
    last_heartbeat BIGINT NULL,
    load           TEXT NULL,
    config_version BIGINT NOT NULL DEFAULT 0,
    UNIQUE (kind, name)
);

CREATE TABLE jwt_seen (
    jti        TEXT PRIMARY KEY NOT NULL,
    node_id    TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX jwt_seen_expires_at ON jwt_seen (expires_at);

CREATE TABLE links (
    link_id         TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    generation      BIGINT NOT NULL,
    from_node       TEXT NOT NULL REFERENCES nodes (node_id),
    listen          TEXT NOT NULL,
    to_node         TEXT NOT NULL REFERENCES nodes (node_id),
    target          TEXT NOT NULL,
    allowed_uids    TEXT NOT NULL,
    allowed_gids    TEXT NOT NULL,
    relays          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    grant_not_after BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX links_from_node ON links (from_node);
CREATE INDEX links_to_node ON links (to_node);

CREATE TABLE relay_events (
--sqlite:     seq        INTEGER PRIMARY KEY AUTOINCREMENT,
--postgres:     seq        BIGINT PRIMARY KEY NOT NULL,
    relay_id   TEXT NOT NULL,
    link_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    grant_hex  TEXT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX relay_events_relay_seq ON relay_events (relay_id, seq);

CREATE TABLE api_tokens (
    hash       TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
