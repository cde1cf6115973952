//! Endpoints and `HOST:PORT` addresses (from the controller's API, agent
//! configs, the command line): parsing never panics, an endpoint that
//! parses prints as a string that parses to an equal endpoint, and a
//! listener that parses is on loopback or a Unix socket.
#![no_main]

use comsat_protocol::endpoint::{Endpoint, split_host_port};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = split_host_port(s);
    if let Ok(e) = Endpoint::parse(s) {
        assert_eq!(Endpoint::parse(&e.to_string()), Ok(e));
    }
    if let Ok(Endpoint::Tcp(addr) | Endpoint::Udp(addr)) = Endpoint::parse_listen(s) {
        let ip = addr.parse::<std::net::SocketAddr>().map(|a| a.ip());
        assert!(ip.is_ok_and(|ip| ip.is_loopback()), "{addr}");
    }
});
