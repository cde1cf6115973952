-- A link listener's workload rules (`allow`): a JSON array of strings,
-- each selectors separated by spaces (see comsat_protocol::workload).
ALTER TABLE links ADD COLUMN allow_rules TEXT NOT NULL DEFAULT '[]';
-- 1: side B starts each target connection with a PROXY protocol v2 header.
ALTER TABLE links ADD COLUMN proxy_protocol BIGINT NOT NULL DEFAULT 0;
