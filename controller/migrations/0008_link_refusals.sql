-- Link halves an agent refused (outside its owner's consent), and why.
-- An agent replaces its rows each time it applies its desired state.
CREATE TABLE link_refusals (
    link_id  TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    reason   TEXT NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (link_id, agent_id)
);
