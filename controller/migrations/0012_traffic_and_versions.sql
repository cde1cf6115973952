-- What relays report of the links they carry (the latest counters per
-- link and relay, and the rate since the report before), and the software
-- version each node last reported.
CREATE TABLE link_traffic (
    link_id     TEXT NOT NULL,
    relay_id    TEXT NOT NULL,
    a_to_b      BIGINT NOT NULL,
    b_to_a      BIGINT NOT NULL,
    flows_open  BIGINT NOT NULL,
    rate_a_to_b BIGINT NOT NULL,
    rate_b_to_a BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (link_id, relay_id)
);
CREATE TABLE node_versions (
    node_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    at      BIGINT NOT NULL
);
