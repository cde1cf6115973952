-- Relay event numbers come from this one-row counter, updated in the
--sqlite: -- writer's transaction (see store/sql.rs); `changes` counts every change
--sqlite: -- nodes must hear of. Same as PostgreSQL.
--postgres: -- writer's transaction (see store/sql.rs): its row lock orders writers, so
--postgres: -- numbers are committed in order. `changes` counts every change nodes must
--postgres: -- hear of; controllers sharing the database watch both. Same as SQLite.
CREATE TABLE event_seq (
--sqlite:     id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
--postgres:     id  BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    seq     BIGINT NOT NULL,
    changes BIGINT NOT NULL
);
INSERT INTO event_seq (id, seq, changes) SELECT 1, COALESCE(MAX(seq), 0), 0 FROM relay_events;
