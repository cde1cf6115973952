-- A link listener's workload rules (`allow`): a JSON array of strings,
-- each selectors separated by spaces (see comsat_protocol::workload).
ALTER TABLE links ADD COLUMN allow_rules TEXT NOT NULL DEFAULT '[]';
