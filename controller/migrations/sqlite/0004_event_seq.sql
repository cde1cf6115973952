-- Relay event numbers come from this one-row counter, updated in the
-- writer's transaction (see store/sql.rs); `changes` counts every change
-- nodes must hear of. Same as PostgreSQL.
CREATE TABLE event_seq (
    id  INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq     BIGINT NOT NULL,
    changes BIGINT NOT NULL
);
INSERT INTO event_seq (id, seq, changes) SELECT 1, COALESCE(MAX(seq), 0), 0 FROM relay_events;
