-- Limits the relays enforce on a link (NULL: unlimited).
ALTER TABLE links ADD COLUMN max_flows BIGINT NULL;
