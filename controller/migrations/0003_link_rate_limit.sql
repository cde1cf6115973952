-- Bytes per second the relays let a link carry in each direction (NULL: unlimited).
ALTER TABLE links ADD COLUMN rate_limit BIGINT NULL;
