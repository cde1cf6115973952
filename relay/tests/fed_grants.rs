//! A relay fed in process ([`Relay::bind_fed`], [`RelayHandle::set_grants`],
//! as an enrolled relay's controller sync feeds it): it serves the grants
//! handed over, at once, and never the files of its grants directory, which
//! is only the sync's cache.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use comsat_node::keys::{Generate, RandomId};
use comsat_protocol::grant::{Grant, GrantSide, LinkLimits, SignedGrant};
use comsat_protocol::{LinkId, NodeId, RelayId, SigningKey};
use comsat_relay::{Relay, RelayConfig};

fn config(dir: &Path, relay: RelayId, authority: &SigningKey) -> RelayConfig {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).expect("cert file");
    comsat_node::keys::write_secret_file(&k, key.serialize_pem().as_bytes()).expect("key");
    let grants = dir.join("grants");
    std::fs::create_dir_all(&grants).expect("grants dir");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    RelayConfig::new(relay, listen, c, k, authority.public(), grants)
}

fn grant(authority: &SigningKey, relay: RelayId) -> SignedGrant {
    let side = || GrantSide {
        node_id: NodeId::random(),
        sign_pub: SigningKey::generate().public(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    Grant {
        link_id: LinkId::random(),
        generation: 1,
        relays: vec![relay],
        side_a: side(),
        side_b: side(),
        not_after: now + 3600,
        buffer_limit: 0,
        limits: LinkLimits::default(),
    }
    .sign(authority)
    .expect("sign")
}

/// Waits (at most 5 s) until `links()` is `want`.
async fn links_become(links: &dyn Fn() -> u64, want: u64) {
    let start = Instant::now();
    while links() != want {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the relay holds {} grants, not {want}",
            links()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_fed_relay_serves_the_grants_handed_over_and_not_its_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = SigningKey::generate();
    let relay_id = RelayId::random();
    let cfg = config(dir.path(), relay_id, &authority);
    // A valid grant file in the directory a static relay would read.
    let on_disk = grant(&authority, relay_id).encode().expect("encode");
    std::fs::write(cfg.grants_dir.join("disk.grant"), on_disk).expect("grant file");

    let relay = Relay::bind_fed(cfg).expect("bind");
    let handle = relay.handle();
    let probe = relay.load_probe();
    let links = move || probe().links;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));

    // Longer than the directory poll: the file is never taken.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(links(), 0, "a fed relay read its grants directory");

    let (a, b) = (grant(&authority, relay_id), grant(&authority, relay_id));
    handle.set_grants(vec![("a".into(), a.clone()), ("b".into(), b)]);
    links_become(&links, 2).await;
    // A new set replaces the old one whole: the link left out is revoked.
    handle.set_grants(vec![("a".into(), a)]);
    links_become(&links, 1).await;
    // A grant for another relay, or signed by another key, is refused.
    let stranger = SigningKey::generate();
    handle.set_grants(vec![
        ("other relay".into(), grant(&authority, RelayId::random())),
        ("other authority".into(), grant(&stranger, relay_id)),
    ]);
    links_become(&links, 0).await;

    let _ = stop.send(());
    served.await.expect("join").expect("relay");
}
