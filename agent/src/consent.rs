//! What the owner of an edge box lets the controller ask of its agent: the
//! targets it will dial and the addresses it will listen on, for links the
//! controller assigns.
//!
//! The controller decides which two agents form a link; it does not decide
//! what an agent reaches on its own machine and network. Without consent,
//! anyone allowed to create links could make an agent dial its Docker
//! socket or a cloud metadata address, or bind a Unix socket anywhere. The
//! list is the agent's own (a file on the edge box, never written by the
//! controller); a link outside it is refused at the agent, which tells the
//! controller why, and nothing is dialled or bound.
//!
//! Each entry is `tcp://HOSTS:PORTS`, `udp://HOSTS:PORTS` or
//! `unix:///PATH`:
//!
//! - `HOSTS`: an IP address, a network (`10.0.0.0/8`, `[fd00::/8]`), a DNS
//!   name (`db.internal`), names under a domain (`*.internal`), or `*`. An
//!   address is matched by addresses and networks, a name by names (the
//!   owner who allows a name allows whatever it resolves to).
//! - `PORTS`: a port, a range (`8000-8099`) or `*`.
//! - `PATH`: one socket, or every socket under a directory (`/run/app/*`).
//!   A link path with a `..` component is never matched (a symbolic link
//!   under an allowed directory is the owner's to avoid).
//!
//! The default, where the owner wrote nothing: dial and listen on loopback
//! TCP and UDP only (`127.0.0.0/8`, `::1`, `localhost`), no Unix socket.

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use comsat_protocol::endpoint::{Endpoint, split_host_port};
use ipnet::IpNet;
use serde::Deserialize;

use crate::config::LocalRole;

/// Most entries in one list.
pub const MAX_ENTRIES: usize = 256;

/// Longest consent file read.
pub const MAX_CONSENT_FILE: u64 = 64 * 1024;

/// The file, in an enrolled agent's data dir, that holds its consent.
pub const CONSENT_FILE: &str = "consent.toml";

/// The targets and listen addresses allowed where the owner wrote nothing.
pub const DEFAULT: &[&str] = &[
    "tcp://127.0.0.0/8:*",
    "tcp://[::1]:*",
    "tcp://localhost:*",
    "udp://127.0.0.0/8:*",
    "udp://[::1]:*",
    "udp://localhost:*",
];

/// An entry that does not parse, and the forms that do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsentError {
    /// Not one of the forms.
    #[error(
        "`{entry}`: {why}; write tcp://HOSTS:PORTS or udp://HOSTS:PORTS (HOSTS: an address, \
         a network like 10.0.0.0/8, a name, *.domain or *; PORTS: a port, FROM-TO or *) or \
         unix:///PATH (PATH/* for every socket under a directory)"
    )]
    Entry {
        /// The entry, as written.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More than [`MAX_ENTRIES`] entries in a list.
    #[error("{list}: more than {MAX_ENTRIES} entries")]
    TooMany {
        /// `targets` or `listen`.
        list: &'static str,
    },
    /// The file is no TOML of the consent keys.
    #[error("not a consent file (it holds `targets = [...]` and `listen = [...]` only): {0}")]
    File(String),
}

/// One allowed host set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hosts {
    Any,
    Net(IpNet),
    Name(String),
    /// Names ending in `.SUFFIX`.
    Under(String),
}

/// One entry of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `tcp://` (`udp` false) or `udp://` (`udp` true) hosts and ports.
    Ip {
        udp: bool,
        hosts: Hosts,
        ports: (u16, u16),
    },
    Socket(PathBuf),
    SocketsUnder(PathBuf),
}

impl Entry {
    fn parse(s: &str) -> Result<Self, ConsentError> {
        let bad = |why| ConsentError::Entry {
            entry: s.to_owned(),
            why,
        };
        if s.len() > comsat_protocol::endpoint::MAX_ENDPOINT_LEN {
            return Err(bad("too long"));
        }
        if let Some(path) = s.strip_prefix("unix://") {
            let (path, under) = match path.strip_suffix("/*") {
                Some(dir) => (dir, true),
                None => (path, false),
            };
            let path = PathBuf::from(path);
            if !path.is_absolute() || !plain(&path) || path.as_os_str().len() < 2 && !under {
                return Err(bad("a socket path must be absolute, without .."));
            }
            return Ok(if under {
                Self::SocketsUnder(path)
            } else {
                Self::Socket(path)
            });
        }
        let (udp, rest) = match (s.strip_prefix("tcp://"), s.strip_prefix("udp://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            (None, None) => return Err(bad("neither tcp://, udp:// nor unix://")),
        };
        let (hosts, ports) = rest.rsplit_once(':').ok_or_else(|| bad("no :PORTS"))?;
        let ports = match ports {
            "*" => (0, u16::MAX),
            p => match p.split_once('-') {
                Some((from, to)) => (
                    from.parse().map_err(|_| bad("bad port range"))?,
                    to.parse().map_err(|_| bad("bad port range"))?,
                ),
                None => {
                    let p = p.parse().map_err(|_| bad("bad port"))?;
                    (p, p)
                }
            },
        };
        if ports.0 > ports.1 {
            return Err(bad("a port range goes from low to high"));
        }
        let hosts = hosts
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(hosts);
        let hosts = if hosts == "*" {
            Hosts::Any
        } else if let Ok(net) = hosts.parse::<IpNet>() {
            Hosts::Net(net.trunc())
        } else if let Ok(ip) = hosts.parse::<IpAddr>() {
            Hosts::Net(IpNet::from(ip))
        } else if let Some(domain) = hosts.strip_prefix("*.") {
            if !comsat_protocol::endpoint::valid_host(domain) {
                return Err(bad("bad domain after *."));
            }
            Hosts::Under(domain.to_ascii_lowercase())
        } else if comsat_protocol::endpoint::valid_host(hosts) && !hosts.contains(':') {
            Hosts::Name(hosts.to_ascii_lowercase())
        } else {
            return Err(bad("bad host"));
        };
        Ok(Self::Ip { udp, hosts, ports })
    }

    fn allows(&self, endpoint: &Endpoint) -> bool {
        match (self, endpoint) {
            (Self::Ip { udp, hosts, ports }, Endpoint::Tcp(addr) | Endpoint::Udp(addr)) => {
                if *udp != endpoint.is_datagram() {
                    return false;
                }
                let Ok((host, port)) = split_host_port(addr) else {
                    return false;
                };
                if port < ports.0 || port > ports.1 {
                    return false;
                }
                match (hosts, host.parse::<IpAddr>()) {
                    (Hosts::Any, _) => true,
                    // `::ffff:169.254.169.254` is the IPv4 address it maps.
                    (Hosts::Net(net), Ok(ip)) => net.contains(&ip.to_canonical()),
                    (Hosts::Name(name), Err(_)) => host.eq_ignore_ascii_case(name),
                    (Hosts::Under(domain), Err(_)) => {
                        let host = host.to_ascii_lowercase();
                        host.strip_suffix(domain.as_str())
                            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
                    }
                    _ => false,
                }
            }
            (Self::Socket(allowed), Endpoint::Unix(path)) => plain(path) && path == allowed,
            (Self::SocketsUnder(dir), Endpoint::Unix(path)) => {
                plain(path) && path != dir && path.starts_with(dir)
            }
            _ => false,
        }
    }
}

/// Whether `path` has no `..` component, so it stays where it says (`.`
/// components and repeated `/` are no component at all).
fn plain(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// One list: the entries as written, and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct List {
    written: Vec<String>,
    entries: Vec<Entry>,
}

impl List {
    fn parse(list: &'static str, written: &[String]) -> Result<Self, ConsentError> {
        if written.len() > MAX_ENTRIES {
            return Err(ConsentError::TooMany { list });
        }
        Ok(Self {
            written: written.to_vec(),
            entries: written
                .iter()
                .map(|e| Entry::parse(e))
                .collect::<Result<_, _>>()?,
        })
    }

    fn allows(&self, endpoint: &Endpoint) -> bool {
        self.entries.iter().any(|e| e.allows(endpoint))
    }
}

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.written.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.written.join(", "))
    }
}

/// The `targets = [...]` line of a consent file allowing `targets`.
pub fn targets_text(targets: &[String]) -> String {
    format!("targets = {}\n", toml::Value::from(targets.to_vec()))
}

/// The consent file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentFile {
    /// Targets this agent dials for links the controller assigns.
    targets: Option<Vec<String>>,
    /// Where it listens for them.
    listen: Option<Vec<String>>,
}

/// The targets an agent will dial and the addresses it will listen on for
/// the links its controller assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    targets: List,
    listen: List,
}

impl Default for Consent {
    fn default() -> Self {
        let default: Vec<String> = DEFAULT.iter().map(|s| (*s).to_owned()).collect();
        Self::new(&default, &default).expect("the default consent parses")
    }
}

impl Consent {
    /// Consent to `targets` and `listen` (entries as in the module docs).
    pub fn new(targets: &[String], listen: &[String]) -> Result<Self, ConsentError> {
        Ok(Self {
            targets: List::parse("targets", targets)?,
            listen: List::parse("listen", listen)?,
        })
    }

    /// Parses a consent file's text: `targets = [...]` and `listen =
    /// [...]`; a list left out keeps its default.
    pub fn parse(text: &str) -> Result<Self, ConsentError> {
        let file: ConsentFile =
            toml::from_str(text).map_err(|e| ConsentError::File(e.to_string()))?;
        let default: Vec<String> = DEFAULT.iter().map(|s| (*s).to_owned()).collect();
        Self::new(
            file.targets.as_deref().unwrap_or(&default),
            file.listen.as_deref().unwrap_or(&default),
        )
    }

    /// Reads [`CONSENT_FILE`] in `dir`, or the default if there is none.
    pub fn load(dir: &Path) -> Result<Self, crate::AgentError> {
        use std::io::Read;
        let path = dir.join(CONSENT_FILE);
        let io = |source| crate::AgentError::Io {
            path: path.clone(),
            source,
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io(e)),
        };
        let mut text = String::new();
        file.take(MAX_CONSENT_FILE + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        let bad = |reason: String| crate::AgentError::Config {
            path: path.clone(),
            reason,
        };
        if text.len() as u64 > MAX_CONSENT_FILE {
            return Err(bad(format!("larger than {MAX_CONSENT_FILE} bytes")));
        }
        Self::parse(&text).map_err(|e| bad(e.to_string()))
    }

    /// Whether this agent may take on a link half in `role`: `Err` names
    /// the address and what is allowed.
    pub fn check(&self, role: &LocalRole) -> Result<(), String> {
        let (what, endpoint, list) = match role {
            LocalRole::Target(e) => ("target", e, &self.targets),
            LocalRole::Listen(e) => ("listen address", e, &self.listen),
        };
        if list.allows(endpoint) {
            return Ok(());
        }
        let key = match role {
            LocalRole::Target(_) => "targets",
            LocalRole::Listen(_) => "listen",
        };
        Err(format!(
            "{what} {endpoint} is outside this agent's consent ({key} allowed: {list}; \
             the agent's owner sets `{key}` in its {CONSENT_FILE})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> LocalRole {
        LocalRole::Target(Endpoint::parse(s).expect("endpoint"))
    }

    fn listen(s: &str) -> LocalRole {
        LocalRole::Listen(Endpoint::parse_listen(s).expect("endpoint"))
    }

    /// Asserts `c` allows every target in `allowed` and refuses every one
    /// in `refused`, each refusal naming the address and the file.
    fn assert_targets(c: &Consent, allowed: &[&str], refused: &[&str]) {
        for ok in allowed {
            assert_eq!(c.check(&target(ok)), Ok(()), "{ok}");
        }
        for no in refused {
            let e = c.check(&target(no)).expect_err(no);
            assert!(e.contains(no) && e.contains("consent.toml"), "{e}");
        }
    }

    fn consent(targets: &[&str]) -> Consent {
        let t: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
        Consent::new(&t, &[]).expect("consent")
    }

    #[test]
    fn the_default_is_loopback_tcp_and_udp_only() {
        let c = Consent::default();
        let allowed = [
            "tcp://127.0.0.1:5432",
            "tcp://127.9.9.9:1",
            "tcp://[::1]:80",
            "tcp://localhost:9000",
            "tcp://LOCALHOST:9000",
            "tcp://[::ffff:127.0.0.1]:22",
            "udp://127.0.0.1:53",
            "udp://[::1]:5683",
            "udp://localhost:514",
        ];
        let refused = [
            "udp://10.0.0.1:53",
            "udp://169.254.169.254:53",
            "tcp://169.254.169.254:80",
            "tcp://[::ffff:169.254.169.254]:80",
            "tcp://10.0.0.1:5432",
            "tcp://db.internal:5432",
            "tcp://localhost.evil.example:80",
            "unix:///var/run/docker.sock",
        ];
        assert_targets(&c, &allowed, &refused);
        assert_eq!(c.check(&listen("tcp://127.0.0.1:7000")), Ok(()));
        assert_eq!(c.check(&listen("udp://127.0.0.1:5353")), Ok(()));
        assert!(c.check(&listen("unix:///run/x.sock")).is_err());
    }

    #[test]
    fn tcp_and_udp_entries_allow_their_own_protocol_only() {
        let c = consent(&[
            "tcp://10.0.0.0/8:5432",
            "udp://10.0.0.53:53",
            "udp://*.lan:5683",
        ]);
        let allowed = [
            "tcp://10.1.2.3:5432",
            "udp://10.0.0.53:53",
            "udp://coap.lan:5683",
        ];
        let refused = [
            "udp://10.1.2.3:5432",
            "tcp://10.0.0.53:53",
            "udp://10.0.0.54:53",
            "tcp://coap.lan:5683",
        ];
        assert_targets(&c, &allowed, &refused);
    }

    #[test]
    fn networks_names_ports_and_socket_directories() {
        let c = consent(&[
            "tcp://10.0.0.0/8:5432",
            "tcp://[fd00::/8]:8000-8099",
            "tcp://*.internal:443",
            "tcp://db.example:*",
            "unix:///run/app/*",
            "unix:///run/one.sock",
        ]);
        let allowed = [
            "tcp://10.1.2.3:5432",
            "tcp://[fd12::1]:8050",
            "tcp://api.internal:443",
            "tcp://a.b.internal:443",
            "tcp://DB.example:1",
            "unix:///run/app/s.sock",
            "unix:///run/app/sub/s.sock",
            "unix:///run/app/./s.sock",
            "unix:///run/one.sock",
        ];
        let refused = [
            "tcp://10.1.2.3:5433",
            "tcp://11.0.0.1:5432",
            "tcp://[fd12::1]:8100",
            "tcp://internal:443",
            "tcp://evilinternal:443",
            "tcp://api.internal:80",
            "tcp://db.example.evil:1",
            "unix:///run/app",
            "unix:///run/app/../docker.sock",
            "unix:///run/one.sock2",
            "unix:///run/other.sock",
        ];
        assert_targets(&c, &allowed, &refused);
        // An address is not matched by a name, nor a name by a network.
        assert!(
            consent(&["tcp://localhost:*"])
                .check(&target("tcp://127.0.0.1:1"))
                .is_err()
        );
        assert!(
            consent(&["tcp://127.0.0.0/8:*"])
                .check(&target("tcp://localhost:1"))
                .is_err()
        );
        assert_eq!(
            consent(&["tcp://*:*"]).check(&target("tcp://anything:1")),
            Ok(())
        );
        assert!(consent(&[]).check(&target("tcp://127.0.0.1:1")).is_err());
    }

    #[test]
    fn bad_entries_and_files_are_named() {
        for bad in [
            "http://x:1",
            "tcp://x",
            "udp://x",
            "sctp://x:1",
            "udp://x:70000",
            "tcp://x:70000",
            "tcp://x:9-1",
            "tcp://10.0.0.0/33:1",
            "tcp://bad host:1",
            "tcp://*.:1",
            "unix://relative",
            "unix:///run/../x",
            "unix:///",
        ] {
            let e = Consent::new(&[bad.to_owned()], &[])
                .expect_err(bad)
                .to_string();
            assert!(e.contains(bad) && e.contains("tcp://HOSTS:PORTS"), "{e}");
        }
        let many = vec!["tcp://*:*".to_owned(); MAX_ENTRIES + 1];
        assert!(Consent::new(&many, &[]).is_err());
        let e = Consent::parse("target = []")
            .expect_err("misspelt key")
            .to_string();
        assert!(e.contains("target"), "{e}");
        let text = targets_text(&["unix:///run/app/*".to_owned()]);
        let c = Consent::parse(&text).expect("file");
        assert_eq!(c.check(&target("unix:///run/app/a.sock")), Ok(()));
        assert!(
            c.check(&target("tcp://127.0.0.1:1")).is_err(),
            "a list written replaces its default"
        );
        assert_eq!(
            c.check(&listen("tcp://127.0.0.1:1")),
            Ok(()),
            "a list left out keeps it"
        );
    }

    #[test]
    fn a_missing_file_is_the_default_and_a_large_one_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(
            Consent::load(dir.path()).expect("default"),
            Consent::default()
        );
        let big = format!("targets = [{}]", "\"tcp://*:*\",".repeat(8000));
        std::fs::write(dir.path().join(CONSENT_FILE), big).expect("write");
        let e = Consent::load(dir.path())
            .expect_err("too large")
            .to_string();
        assert!(e.contains("larger than"), "{e}");
    }
}
