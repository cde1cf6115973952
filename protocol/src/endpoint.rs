//! Addresses, with one grammar for every party: `HOST:PORT` (relays, the
//! controller) and the local ends of a link, `tcp://HOST:PORT`,
//! `unix:///ABSOLUTE/PATH` (streams) or `udp://HOST:PORT` (datagrams; a
//! link's two ends are both streams or both datagrams).
//!
//! A `HOST` is an IP address (IPv6 in brackets) or a DNS name of letters,
//! digits, `-` and `.`, as a certificate can carry it; a `PORT` is 0 to
//! 65535 (0: any free port, where a listener allows it). An agent listens on loopback or a Unix socket only: it never
//! accepts connections from the network ([`Endpoint::parse_listen`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Longest endpoint accepted.
pub const MAX_ENDPOINT_LEN: usize = 512;

/// Why an address or endpoint was refused: what was wrong, and the form
/// expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// Longer than [`MAX_ENDPOINT_LEN`].
    #[error("longer than {MAX_ENDPOINT_LEN} bytes")]
    TooLong,
    /// Not `HOST:PORT`.
    #[error("`{0}`: expected HOST:PORT (a name or an IP address, IPv6 in [], and a port)")]
    HostPort(String),
    /// Neither `tcp://`, `udp://` nor `unix://`.
    #[error("`{0}`: expected tcp://HOST:PORT, udp://HOST:PORT or unix:///PATH")]
    Scheme(String),
    /// A `unix://` endpoint whose path is not absolute.
    #[error("`{0}`: a unix socket must be unix:///ABSOLUTE/PATH")]
    UnixPath(String),
    /// A listener off loopback.
    #[error(
        "`{0}`: agents listen on loopback or Unix sockets only (they never accept \
         connections from the network): use tcp://127.0.0.1:PORT, tcp://[::1]:PORT, \
         udp://127.0.0.1:PORT, udp://[::1]:PORT or unix:///PATH"
    )]
    NotLoopback(String),
}

/// Splits `HOST:PORT` into its host (brackets of an IPv6 address removed)
/// and port, checking both.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), EndpointError> {
    let bad = || EndpointError::HostPort(addr.to_owned());
    if addr.len() > MAX_ENDPOINT_LEN {
        return Err(EndpointError::TooLong);
    }
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = after.strip_prefix(':').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (host, port)
        }
        None => addr.rsplit_once(':').ok_or_else(bad)?,
    };
    let port = port.parse::<u16>().map_err(|_| bad())?;
    if !valid_host(host) || host.contains(':') && !addr.starts_with('[') {
        return Err(bad());
    }
    Ok((host, port))
}

/// Whether `host` is a name a certificate can carry: an IP address or a
/// DNS name of letters, digits, `-` and `.`.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The source a per-source limit counts: an IPv4 address (an IPv4-mapped
/// IPv6 one as IPv4), or the /64 of an IPv6 address, which one machine
/// usually holds whole (counting its addresses one by one would give it
/// 2^64 shares).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// A local end of a link: where an agent listens, or the target it dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `tcp://HOST:PORT`: the `HOST:PORT`, as written.
    Tcp(String),
    /// `unix:///PATH`: the absolute path.
    Unix(PathBuf),
    /// `udp://HOST:PORT`: the `HOST:PORT`, as written. Each local source
    /// address is a flow of datagrams.
    Udp(String),
}

impl Endpoint {
    /// Parses `tcp://HOST:PORT`, `udp://HOST:PORT` or
    /// `unix:///ABSOLUTE/PATH`.
    pub fn parse(s: &str) -> Result<Self, EndpointError> {
        if s.len() > MAX_ENDPOINT_LEN {
            return Err(EndpointError::TooLong);
        }
        for (scheme, make) in [
            ("tcp://", Self::Tcp as fn(String) -> Self),
            ("udp://", Self::Udp),
        ] {
            if let Some(addr) = s.strip_prefix(scheme) {
                split_host_port(addr).map_err(|_| EndpointError::HostPort(s.to_owned()))?;
                return Ok(make(addr.to_owned()));
            }
        }
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') || path.len() < 2 || path.contains('\0') {
                return Err(EndpointError::UnixPath(s.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        Err(EndpointError::Scheme(s.to_owned()))
    }

    /// Parses an endpoint an agent listens on: [`Self::parse`], and a TCP
    /// or UDP one must be a loopback IP address.
    pub fn parse_listen(s: &str) -> Result<Self, EndpointError> {
        let endpoint = Self::parse(s)?;
        if let Self::Tcp(addr) | Self::Udp(addr) = &endpoint {
            let loopback = addr
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            if !loopback {
                return Err(EndpointError::NotLoopback(s.to_owned()));
            }
        }
        Ok(endpoint)
    }

    /// The port of a TCP or UDP endpoint.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Tcp(addr) | Self::Udp(addr) => split_host_port(addr).ok().map(|(_, port)| port),
            Self::Unix(_) => None,
        }
    }

    /// The Unix socket path, if this is one.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Self::Unix(p) => Some(p),
            Self::Tcp(_) | Self::Udp(_) => None,
        }
    }

    /// Whether this end carries datagrams (`udp://`) rather than streams.
    pub fn is_datagram(&self) -> bool {
        matches!(self, Self::Udp(_))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Udp(a) => write!(f, "udp://{a}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_64s() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source_of(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:3::1")),
            source_of(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn host_port_takes_names_and_addresses_and_refuses_the_rest() {
        assert_eq!(
            split_host_port("relay.example:4433"),
            Ok(("relay.example", 4433))
        );
        assert_eq!(split_host_port("10.0.0.1:4433"), Ok(("10.0.0.1", 4433)));
        assert_eq!(split_host_port("[::1]:4433"), Ok(("::1", 4433)));
        assert_eq!(split_host_port("relay:0"), Ok(("relay", 0)));
        for bad in [
            "",
            "relay",
            ":4433",
            "relay:",
            "relay:65536",
            "::1:4433",
            "[::1]4433",
            "[nothost]:1",
            "bad host:1",
            "-x.example:1",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
        assert!(valid_host("relay-1.example.com"));
        assert!(valid_host("::1"));
        assert!(!valid_host("bad host"));
        assert!(!valid_host("-x.example"));
    }

    #[test]
    fn endpoints_round_trip_and_listeners_stay_on_loopback() {
        for s in [
            "tcp://127.0.0.1:7000",
            "tcp://[::1]:7000",
            "tcp://db.internal:5432",
            "unix:///run/x.sock",
            "udp://127.0.0.1:53",
            "udp://[::1]:5683",
            "udp://syslog.internal:514",
        ] {
            let e = Endpoint::parse(s).expect(s);
            assert_eq!(e.to_string(), s);
        }
        assert!(Endpoint::parse_listen("tcp://127.0.0.1:7000").is_ok());
        assert!(Endpoint::parse_listen("tcp://[::1]:7000").is_ok());
        assert!(Endpoint::parse_listen("unix:///run/x.sock").is_ok());
        assert!(Endpoint::parse_listen("udp://127.0.0.1:5353").is_ok());
        assert!(
            Endpoint::parse("udp://127.0.0.1:53")
                .expect("udp")
                .is_datagram()
        );
        assert!(
            !Endpoint::parse("tcp://127.0.0.1:53")
                .expect("tcp")
                .is_datagram()
        );
        for off in [
            "udp://0.0.0.0:53",
            "udp://localhost:53",
            "tcp://0.0.0.0:7000",
            "tcp://10.0.0.1:7000",
            "tcp://localhost:7000",
        ] {
            assert_eq!(
                Endpoint::parse_listen(off),
                Err(EndpointError::NotLoopback(off.into()))
            );
        }
        for bad in [
            "127.0.0.1:7000",
            "sctp://127.0.0.1:7000",
            "udp://127.0.0.1",
            "tcp://127.0.0.1",
            "unix://relative/path",
            "unix:///",
            "unix:///a\0b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        let any = Endpoint::parse_listen("tcp://127.0.0.1:0").expect("any port");
        assert_eq!(any.port(), Some(0));
        let long = format!("unix:///{}", "a".repeat(MAX_ENDPOINT_LEN));
        assert_eq!(Endpoint::parse(&long), Err(EndpointError::TooLong));
    }
}
