-- Relays a link's agent left because they stopped answering, as the agent
-- said: its peer is told through its desired state, to leave them too.
-- One row per link and agent, the latest.
CREATE TABLE peer_moves (
    link_id  TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    relay_id TEXT NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (link_id, agent_id)
);
