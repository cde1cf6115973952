-- A link's own QUIC connection on its agents (NULL: the shared one).
ALTER TABLE links ADD COLUMN connection TEXT NULL;
-- Relays: HOST:PORT of their interactive listener (NULL: none).
ALTER TABLE nodes ADD COLUMN interactive_addr TEXT NULL;
