-- Console sessions: a signed-in API token's session, found by the SHA-256
-- of its cookie (the cookie itself is never stored). The session lasts
-- while the token it was opened with stays valid, until `expires_at`.
CREATE TABLE console_sessions (
    id_hash    TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
