"""Checks comsat's SPIFFE documents with py-spiffe, a SPIFFE library that
owes comsat nothing: each X.509-SVID parses as one (with its key) and has
the SPIFFE ID expected, and the trust domain's bundle, as the controller's
bundle endpoint serves it, parses as a SPIFFE bundle whose X.509
authorities issued every SVID.

Usage: svids.py --trust-domain TD --bundle FILE
                --svid CERT KEY SPIFFE_ID [--svid ...]
Exits 0 when everything holds; otherwise says what does not.
"""

import argparse
import base64
import json
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain, X509Bundle, X509Svid


def b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def bundle_authorities(trust_domain: TrustDomain, text: bytes) -> X509Bundle:
    """The X.509 authorities of a SPIFFE bundle (a JWK set), as py-spiffe
    parses them; each JWK's key must be its certificate's."""
    doc = json.loads(text)
    assert isinstance(doc.get("spiffe_sequence"), int), "spiffe_sequence is no integer"
    assert isinstance(doc.get("spiffe_refresh_hint"), int), "spiffe_refresh_hint is no integer"
    ders = []
    for jwk in doc["keys"]:
        assert jwk["use"] == "x509-svid", f"a key of use {jwk['use']!r}"
        assert len(jwk["x5c"]) == 1, "an X.509 authority's x5c holds its certificate alone"
        ders.append(base64.b64decode(jwk["x5c"][0]))
    assert ders, "the bundle holds no X.509 authority"
    bundle = X509Bundle.parse_raw(trust_domain, b"".join(ders))
    assert bundle.trust_domain == trust_domain
    by_der = {a.public_bytes(serialization.Encoding.DER): a for a in bundle.x509_authorities}
    for jwk, der in zip(doc["keys"], ders):
        numbers = by_der[der].public_key().public_numbers()
        if jwk["kty"] == "EC":
            assert jwk["crv"] == {256: "P-256", 384: "P-384", 521: "P-521"}[numbers.curve.key_size]
            assert int.from_bytes(b64url(jwk["x"]), "big") == numbers.x, "x is not the certificate's"
            assert int.from_bytes(b64url(jwk["y"]), "big") == numbers.y, "y is not the certificate's"
        else:
            assert jwk["kty"] == "RSA", f"a JWK of kty {jwk['kty']!r}"
            assert int.from_bytes(b64url(jwk["n"]), "big") == numbers.n, "n is not the certificate's"
            assert int.from_bytes(b64url(jwk["e"]), "big") == numbers.e, "e is not the certificate's"
    return bundle


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--svid", nargs=3, action="append", required=True,
                   metavar=("CERT", "KEY", "SPIFFE_ID"))
    args = p.parse_args()
    trust_domain = TrustDomain(args.trust_domain)
    with open(args.bundle, "rb") as f:
        bundle = bundle_authorities(trust_domain, f.read())
    for cert, key, expected in args.svid:
        with open(cert, "rb") as c, open(key, "rb") as k:
            svid = X509Svid.parse(c.read(), k.read())
        assert svid.spiffe_id == SpiffeId(expected), f"{cert}: {svid.spiffe_id} is not {expected}"
        assert svid.spiffe_id.trust_domain == trust_domain
        # Each certificate of the chain is issued by the next, the last by
        # an authority of the bundle.
        chain = svid.cert_chain
        for child, parent in zip(chain, chain[1:]):
            child.verify_directly_issued_by(parent)
        issuers = [a for a in bundle.x509_authorities if a.subject == chain[-1].issuer]
        for issuer in issuers:
            chain[-1].verify_directly_issued_by(issuer)
        assert issuers, f"{cert}: no authority of the bundle issued its chain"
        print(f"{cert}: an X.509-SVID of {svid.spiffe_id}, chained to the bundle "
              f"({len(chain)} certificate(s))")
    print(f"bundle of {trust_domain}: {len(bundle.x509_authorities)} X.509 authority(ies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
