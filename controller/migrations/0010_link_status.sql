-- What each agent last reported of the link halves it holds. `since` is
-- the controller's time the half entered `state`; an agent replaces its
-- rows with every report.
CREATE TABLE link_status (
    link_id  TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    state    TEXT NOT NULL,
    reason   TEXT,
    relay_id TEXT,
    since    BIGINT NOT NULL,
    PRIMARY KEY (link_id, agent_id)
);
