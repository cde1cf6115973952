-- The flow log: each flow's record from each of its agents. Kept
-- `flow_log_days` and at most `flow_log_max_records` rows (the oldest go
-- first). A record reported twice (an answer lost) is kept once.
CREATE TABLE flow_log (
    agent_id       TEXT NOT NULL,
    link_id        TEXT NOT NULL,
    flow_id        BIGINT NOT NULL,
    side           TEXT NOT NULL,
    started_ms     BIGINT NOT NULL,
    ended_ms       BIGINT NOT NULL,
    caller_id      TEXT,
    caller         TEXT NOT NULL,
    relay_id       TEXT,
    bytes_sent     BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    outcome        TEXT NOT NULL,
    PRIMARY KEY (agent_id, link_id, flow_id, side, started_ms, ended_ms)
);
CREATE INDEX flow_log_ended ON flow_log (ended_ms);
CREATE INDEX flow_log_link ON flow_log (link_id, ended_ms);
