-- Federation: a relay that brings its own certificate (an X.509-SVID of a
-- federated trust domain) keeps its SPIFFE ID; NULL for the others, whose
-- ID is spiffe://TRUST-DOMAIN/relay/NAME. The bundles of the trust domains
-- the controller federates with, PEM.
ALTER TABLE nodes ADD COLUMN spiffe_id TEXT NULL;
CREATE TABLE federated_bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    bundle_pem   TEXT NOT NULL,
    updated_at   BIGINT NOT NULL
);
