//! Hosts behind real NATs, in network namespaces this process makes and
//! removes ([`NatTopology`]).
//!
//! - A public namespace, for the controller and the relays, reachable at
//!   [`PUBLIC_ADDR`].
//! - Per edge, a NAT router namespace: its uplink (`wan`) in the public
//!   network, `198.18.N.2`, masquerading what its edge sends out (nftables,
//!   as home routers and carrier-grade NATs do) and dropping every new
//!   connection from outside, TCP and UDP alike; replies to what the edge
//!   sent pass (conntrack).
//! - Behind it the edge namespace, for an agent and its services, at
//!   `198.19.N.2` with the router as its default route.
//!
//! Addresses are from 198.18.0.0/15 (RFC 2544: benchmarking, never routed
//! on the internet), and nothing leaves the namespaces: none of them is
//! connected to the host's own network. The public namespace routes to the
//! edges' private networks through their routers, so a packet sent to an
//! edge from outside meets the NAT that must drop it.
//!
//! Namespaces are named `comsat-PID-N-…`. Dropping the topology deletes
//! them (their links go with them), during a panic's unwinding too; one
//! left by a process that was killed is deleted by the next topology made.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail, ensure};

/// The public namespace's own address: where its services listen.
pub const PUBLIC_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The prefix of every namespace this harness makes.
const PREFIX: &str = "comsat-";

/// Topologies made by this process so far.
static MADE: AtomicU32 = AtomicU32::new(0);

/// One edge: a NAT router and the namespace behind it.
#[derive(Clone, Debug)]
pub struct Edge {
    /// The edge's namespace (an agent and its services).
    pub ns: String,
    /// The router's namespace.
    pub router: String,
    /// The edge's own (private) address.
    pub addr: Ipv4Addr,
    /// The router's public address: what the public side sees the edge
    /// as.
    pub wan: Ipv4Addr,
}

/// A public namespace and edges behind NATs; deleted when dropped.
#[derive(Debug)]
pub struct NatTopology {
    public: String,
    edges: Vec<Edge>,
    made: Vec<String>,
}

/// Why the topology cannot be made on this machine (not root, or no `ip`,
/// `nft` or `conntrack`), or `None` where it can. Tests that need it say
/// so and skip.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("network namespaces need root (CI runs the tests as root)".into());
    }
    for tool in ["ip", "nft", "conntrack"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (Debian: iproute2, nftables, conntrack)"
            ));
        }
    }
    None
}

/// What a NAT router forwarded: (packets, IP bytes) of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub udp: (u64, u64),
    pub tcp: (u64, u64),
    pub other: (u64, u64),
}

impl NatTopology {
    /// Makes a public namespace and `edges` edges behind NATs (at most
    /// 200).
    pub fn new(edges: u8) -> Result<Self> {
        ensure!((1..=200).contains(&edges), "1 to 200 edges");
        remove_orphans();
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let mut t = Self {
            public: format!("{base}-pub"),
            edges: Vec::new(),
            made: Vec::new(),
        };
        t.add_ns(&t.public.clone())?;
        ip(&["-n", &t.public, "addr", "add", "198.18.0.1/32", "dev", "lo"])?;
        // The public network routes between the edges' routers, as the
        // internet does.
        run_in_ns(&t.public, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
        for i in 1..=edges {
            let edge = Edge {
                ns: format!("{base}-e{i}"),
                router: format!("{base}-r{i}"),
                addr: Ipv4Addr::new(198, 19, i, 2),
                wan: Ipv4Addr::new(198, 18, i, 2),
            };
            t.add_edge(i, &edge)?;
            t.edges.push(edge);
        }
        Ok(t)
    }

    /// The public namespace.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// The edges, in order.
    pub fn edges(&self) -> &[Edge] {
        &self.edges
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // A secondary address takes over when the primary goes, so an
        // address can be changed without losing the network.
        run_in_ns(
            name,
            "sysctl",
            &["-qw", "net.ipv4.conf.all.promote_secondaries=1"],
            None,
        )
    }

    fn add_edge(&mut self, i: u8, e: &Edge) -> Result<()> {
        self.add_ns(&e.router)?;
        self.add_ns(&e.ns)?;
        let public = self.public.clone();
        let (up, wan, lan) = (
            format!("edge{i}"),
            e.wan.to_string(),
            format!("198.19.{i}.1"),
        );
        // Public side <-> router's uplink.
        ip(&[
            "-n", &public, "link", "add", &up, "type", "veth", "peer", "name", "wan", "netns",
            &e.router,
        ])?;
        ip(&[
            "-n",
            &public,
            "addr",
            "add",
            &format!("198.18.{i}.1/24"),
            "dev",
            &up,
        ])?;
        ip(&["-n", &public, "link", "set", &up, "up"])?;
        ip(&[
            "-n",
            &e.router,
            "addr",
            "add",
            &format!("{wan}/24"),
            "dev",
            "wan",
        ])?;
        ip(&["-n", &e.router, "link", "set", "wan", "up"])?;
        ip(&[
            "-n",
            &e.router,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{i}.1"),
        ])?;
        // Router's LAN <-> edge.
        ip(&[
            "-n", &e.router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns",
            &e.ns,
        ])?;
        ip(&[
            "-n",
            &e.router,
            "addr",
            "add",
            &format!("{lan}/24"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", &e.router, "link", "set", "lan", "up"])?;
        ip(&[
            "-n",
            &e.ns,
            "addr",
            "add",
            &format!("{}/24", e.addr),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &e.ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &e.ns, "route", "add", "default", "via", &lan])?;
        // Outsiders' packets for the edge's network go to its router,
        // which must drop them.
        ip(&[
            "-n",
            &public,
            "route",
            "add",
            &format!("198.19.{i}.0/24"),
            "via",
            &wan,
        ])?;
        run_in_ns(&e.router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
        run_in_ns(&e.router, "nft", &["-f", "-"], Some(NAT_RULES))
    }

    /// NAT rebinding: edge `i`'s router (from 0) forgets every mapping
    /// (a conntrack flush) and maps what comes next to source ports in
    /// `ports`, so the edge's next packets reach the public side from a new
    /// port, as when a home router reboots or a carrier NAT times a
    /// mapping out.
    pub fn rebind(&self, i: usize, ports: std::ops::RangeInclusive<u16>) -> Result<()> {
        let e = self.edge(i)?;
        let rules = NAT_RULES.replace(
            "oifname \"wan\" masquerade",
            &format!(
                "oifname \"wan\" meta l4proto {{ tcp, udp }} masquerade to :{}-{}\n        \
                 oifname \"wan\" masquerade",
                ports.start(),
                ports.end()
            ),
        );
        // One transaction: no packet passes between the old rules and the
        // new.
        let replace = format!("delete table ip comsat_nat\n{rules}");
        run_in_ns(&e.router, "nft", &["-f", "-"], Some(&replace))?;
        flush_conntrack(&e.router)
    }

    /// Edge `i`'s router gets a new public address (`198.18.N.last`), as
    /// when a cellular uplink is renumbered; its mappings are forgotten.
    pub fn renumber_uplink(&mut self, i: usize, last: u8) -> Result<()> {
        let e = self.edge(i)?.clone();
        let n = i + 1;
        let new = Ipv4Addr::new(198, 18, n as u8, last);
        readdress(&e.router, "wan", e.wan, new, &format!("198.18.{n}.1"))?;
        let edges = format!("198.19.{n}.0/24");
        ip(&[
            "-n",
            &self.public,
            "route",
            "replace",
            &edges,
            "via",
            &new.to_string(),
        ])?;
        flush_conntrack(&e.router)?;
        self.edges[i].wan = new;
        Ok(())
    }

    /// Edge `i` itself moves to a new address on its network
    /// (`198.19.N.last`), as a box does moving from Wi-Fi to cellular: its
    /// old address is gone, so what it sends leaves from the new one.
    pub fn renumber_edge(&mut self, i: usize, last: u8) -> Result<()> {
        let e = self.edge(i)?.clone();
        let n = i + 1;
        let new = Ipv4Addr::new(198, 19, n as u8, last);
        readdress(&e.ns, "eth0", e.addr, new, &format!("198.19.{n}.1"))?;
        self.edges[i].addr = new;
        Ok(())
    }

    /// Cuts edge `i` off: its router drops everything it would forward, as
    /// when an uplink fails. Mappings it holds stay.
    pub fn cut(&self, i: usize) -> Result<()> {
        let e = self.edge(i)?;
        run_in_ns(&e.router, "nft", &["-f", "-"], Some(CUT_RULES))
    }

    /// Ends [`Self::cut`].
    pub fn heal(&self, i: usize) -> Result<()> {
        let e = self.edge(i)?;
        run_in_ns(
            &e.router,
            "nft",
            &["delete", "table", "inet", "comsat_cut"],
            None,
        )
    }

    /// Random loss on edge `i`'s uplink: its router drops `per_mille` of
    /// every thousand UDP datagrams it forwards, each way, each on its
    /// own (0: none). The edge's and the public side's interfaces hand the
    /// router single datagrams (`gso_max_segs 1`), so a drop takes one
    /// datagram, not a whole segmentation batch.
    pub fn set_loss(&self, i: usize, per_mille: u16) -> Result<()> {
        ensure!(per_mille <= 1000, "loss is per mille");
        let e = self.edge(i)?;
        ip(&[
            "-n",
            &e.ns,
            "link",
            "set",
            "dev",
            "eth0",
            "gso_max_segs",
            "1",
        ])?;
        let up = format!("edge{}", i + 1);
        ip(&[
            "-n",
            &self.public,
            "link",
            "set",
            "dev",
            &up,
            "gso_max_segs",
            "1",
        ])?;
        let rules = format!(
            "table inet comsat_loss {{\n\
             \x20   chain forward {{\n\
             \x20       type filter hook forward priority -20; policy accept;\n\
             \x20       meta l4proto udp numgen random mod 1000 < {per_mille} counter drop\n\
             \x20   }}\n\
             }}\n"
        );
        let _ = run_in_ns(
            &e.router,
            "nft",
            &["delete", "table", "inet", "comsat_loss"],
            None,
        );
        if per_mille > 0 {
            run_in_ns(&e.router, "nft", &["-f", "-"], Some(&rules))?;
        }
        Ok(())
    }

    /// Starts counting what edge `i`'s router forwards, each way, from
    /// zero: see [`Self::forwarded`].
    pub fn count_forwarded(&self, i: usize) -> Result<()> {
        let e = self.edge(i)?;
        let rules = "table inet comsat_count {\n\
             \x20   chain forward {\n\
             \x20       type filter hook forward priority -30; policy accept;\n\
             \x20       meta l4proto udp counter\n\
             \x20       meta l4proto tcp counter\n\
             \x20       meta l4proto != { udp, tcp } counter\n\
             \x20   }\n\
             }\n";
        let _ = run_in_ns(
            &e.router,
            "nft",
            &["delete", "table", "inet", "comsat_count"],
            None,
        );
        run_in_ns(&e.router, "nft", &["-f", "-"], Some(rules))
    }

    /// IP bytes (headers included) edge `i`'s router forwarded, both ways
    /// together, since [`Self::count_forwarded`]: UDP, TCP and anything
    /// else.
    pub fn forwarded(&self, i: usize) -> Result<Forwarded> {
        let e = self.edge(i)?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &e.router,
                "nft",
                "list",
                "table",
                "inet",
                "comsat_count",
            ])
            .stderr(Stdio::null())
            .output()
            .context("running nft list")?;
        ensure!(out.status.success(), "edge {i} counts nothing");
        let text = String::from_utf8_lossy(&out.stdout);
        let counts: Vec<(u64, u64)> = text
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let at = |k: &str| {
                    w.iter()
                        .position(|x| *x == k)
                        .and_then(|p| w.get(p + 1)?.parse().ok())
                };
                Some((at("packets")?, at("bytes")?))
            })
            .collect();
        let [udp, tcp, other] = counts[..] else {
            bail!("unexpected counters on edge {i}: {text}");
        };
        Ok(Forwarded { udp, tcp, other })
    }

    /// Datagrams [`Self::set_loss`] has dropped on edge `i` so far.
    pub fn dropped(&self, i: usize) -> Result<u64> {
        self.drop_counter(i, "comsat_loss")
    }

    /// Packets the current [`Self::cut`] of edge `i` has dropped so far.
    pub fn cut_dropped(&self, i: usize) -> Result<u64> {
        self.drop_counter(i, "comsat_cut")
    }

    /// The drop counter of nftables table `table` on edge `i`'s router.
    fn drop_counter(&self, i: usize, table: &str) -> Result<u64> {
        let e = self.edge(i)?;
        let out = Command::new("ip")
            .args([
                "netns", "exec", &e.router, "nft", "list", "table", "inet", table,
            ])
            .stderr(Stdio::null())
            .output()
            .context("running nft list")?;
        ensure!(out.status.success(), "no table {table} on edge {i}");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("no drop counter")
    }

    /// The UDP mappings edge `i`'s router holds now: for each, the edge's
    /// source address and what the public side sees instead.
    pub fn udp_mappings(&self, i: usize) -> Result<Vec<(SocketAddrV4, SocketAddrV4)>> {
        let e = self.edge(i)?;
        let out = Command::new("ip")
            .args(["netns", "exec", &e.router, "conntrack", "-L", "-p", "udp"])
            .stderr(Stdio::null())
            .output()
            .context("running conntrack -L")?;
        ensure!(out.status.success(), "conntrack -L failed in {}", e.router);
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(parse_mapping)
            .collect())
    }

    fn edge(&self, i: usize) -> Result<&Edge> {
        self.edges.get(i).with_context(|| format!("no edge {i}"))
    }

    /// Runs `f` on a thread inside namespace `ns`: sockets it makes stay in
    /// that namespace wherever they are used later.
    pub fn within<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("{NETNS_DIR}/{ns}"))
            .with_context(|| format!("no network namespace {ns}"))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("entering network namespace {ns}"))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| bail!("a thread in namespace {ns} panicked"))
        })
    }

    /// `program` to be run inside namespace `ns` (`ip netns exec`): the
    /// process is the program itself, so its PID is the program's.
    pub fn command(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for NatTopology {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The NAT router: masquerade on the uplink; forward only what the edge
/// starts and its replies; accept nothing new from outside for itself.
const NAT_RULES: &str = "
table ip comsat_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"wan\" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"lan\" oifname \"wan\" accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname { \"lo\", \"lan\" } accept
    }
}
";

/// From a `conntrack -L` line, the original source and the reply's
/// destination: (the edge's address, what the public side sees).
fn parse_mapping(line: &str) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let field = |key: &str, nth: usize| {
        line.split_whitespace()
            .filter_map(|w| w.strip_prefix(key))
            .nth(nth)
    };
    let addr = |ip: Option<&str>, port: Option<&str>| -> Option<SocketAddrV4> {
        Some(SocketAddrV4::new(ip?.parse().ok()?, port?.parse().ok()?))
    };
    Some((
        addr(field("src=", 0), field("sport=", 0))?,
        addr(field("dst=", 1), field("dport=", 1))?,
    ))
}

/// Moves interface `dev` in `ns` from address `old` to `new` (both /24),
/// keeping its default route through `gateway`.
fn readdress(ns: &str, dev: &str, old: Ipv4Addr, new: Ipv4Addr, gateway: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", &format!("{new}/24"), "dev", dev])?;
    ip(&["-n", ns, "addr", "del", &format!("{old}/24"), "dev", dev])?;
    ip(&["-n", ns, "route", "replace", "default", "via", gateway])
}

/// Forgets every connection the router in `ns` tracks (and with them its
/// NAT mappings).
fn flush_conntrack(ns: &str) -> Result<()> {
    // `conntrack -F` exits 0 with a count on stderr, and 1 only when it
    // cannot run.
    run_in_ns(ns, "conntrack", &["-F"], None)
}

/// A cut uplink: nothing forwarded, before the NAT's own rules see it.
const CUT_RULES: &str = "
table inet comsat_cut {
    chain forward {
        type filter hook forward priority -10; policy accept;
        counter drop
    }
}
";

/// Runs `ip ARGS`, failing with its error output.
fn ip(args: &[&str]) -> Result<()> {
    run("ip", args, None)
}

/// Runs `program ARGS` inside `ns`, with `stdin` if given.
fn run_in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all, stdin)
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes the namespaces of processes that are gone (killed before their
/// topologies dropped).
fn remove_orphans() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conntrack_line_gives_the_edge_and_its_mapping() {
        let line = "udp      17 29 src=198.19.1.2 dst=198.18.0.1 sport=41234 dport=5000 \
                    src=198.18.0.1 dst=198.18.1.2 sport=5000 dport=20345 mark=0 use=1";
        assert_eq!(
            parse_mapping(line),
            Some((
                "198.19.1.2:41234".parse().expect("addr"),
                "198.18.1.2:20345".parse().expect("addr"),
            ))
        );
        assert_eq!(parse_mapping("conntrack v1.4.7: 1 flow entries"), None);
    }
}
