//! A comsat path on loopback: a relay and two agents, each its own
//! process, carrying links from agent A's listeners to targets beside
//! agent B.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use comsat_controller::dev::{DevLayout, DevLink, DevOptions};
use comsat_protocol::grant::LinkLimits;
use comsat_tests::proc::{self, Proc};

/// A link from a loopback listener of agent A to `target` beside agent B.
pub(crate) fn link(name: &str, target: SocketAddr) -> DevLink {
    DevLink {
        name: name.into(),
        listen: "tcp://127.0.0.1:0".into(),
        target: format!("tcp://{target}"),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    }
}

/// A path's files, before or while its processes run.
pub(crate) struct Path {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) layout: DevLayout,
    pub(crate) relay: Option<Proc>,
    /// The relay's admin address (for `/metrics`).
    pub(crate) relay_admin: Option<SocketAddr>,
    pub(crate) agent_a: Option<Proc>,
    pub(crate) agent_b: Option<Proc>,
    /// Relays after the first (see [`Path::start_split`]).
    pub(crate) more_relays: Vec<Proc>,
    /// Agent A's listen address of each link, in the order given.
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) bin: String,
}

impl Path {
    /// Writes the setup for `links`; `limits` re-signs the named links'
    /// grants with limits. Starts nothing.
    pub(crate) fn prepare(
        bin: &str,
        links: Vec<DevLink>,
        limits: &[(&str, LinkLimits)],
    ) -> Result<Self> {
        Self::prepare_relays(bin, links, limits, 0, Ipv4Addr::LOCALHOST.into())
    }

    /// Starts a path whose links list a second relay after the first (as
    /// a link the controller placed on two relays): both relays run.
    pub(crate) async fn start_with_backup(bin: &str, links: Vec<DevLink>) -> Result<Self> {
        let mut path = Self::prepare_relays(bin, links, &[], 1, Ipv4Addr::LOCALHOST.into())?;
        path.start_relay("relay")?;
        let backup = &path.layout.relays[1].config;
        let (relay, _, _) = proc::start_relay(&path.bin, backup, path.dir.path(), "relay-2")?;
        path.more_relays.push(relay);
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Like [`Path::prepare`], with the relay listening on `relay_ip` (its
    /// own network's address, where it runs in a namespace).
    pub(crate) fn prepare_on(bin: &str, links: Vec<DevLink>, relay_ip: IpAddr) -> Result<Self> {
        Self::prepare_relays(bin, links, &[], 0, relay_ip)
    }

    fn prepare_relays(
        bin: &str,
        links: Vec<DevLink>,
        limits: &[(&str, LinkLimits)],
        extra_relays: usize,
        relay_ip: IpAddr,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let extra_relays = (0..extra_relays)
            .map(|_| {
                let port = comsat_tests::free_udp_port()?;
                // An admin listener too: the tests' start_relay reads
                // its address.
                Ok((format!("127.0.0.1:{port}").parse()?, Some(any)))
            })
            .collect::<Result<Vec<_>>>()?;
        let layout = comsat_controller::dev::init(
            &dir.path().join("setup"),
            &DevOptions {
                relay_listen: SocketAddr::new(relay_ip, comsat_tests::free_udp_port()?),
                relay_admin: Some(any),
                agent_admin: [Some(any), Some(any)],
                links,
                pin_sha256: false,
                extra_relays,
            },
        )?;
        for (name, l) in limits {
            layout.set_link_limits(name, l.clone())?;
        }
        Ok(Self {
            dir,
            layout,
            relay: None,
            relay_admin: None,
            agent_a: None,
            agent_b: None,
            more_relays: Vec::new(),
            listen: Vec::new(),
            bin: bin.to_owned(),
        })
    }

    /// Prepares and starts the whole path; returns once agent A is ready.
    pub(crate) async fn start(
        bin: &str,
        links: Vec<DevLink>,
        limits: &[(&str, LinkLimits)],
    ) -> Result<Self> {
        let mut path = Self::prepare(bin, links, limits)?;
        path.start_relay("relay")?;
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Like [`Path::start`], with link `name` on the relay's interactive
    /// listener: a QUIC connection and a thread of its own in the agents
    /// (their `connection` option) and in the relay (`interactive_listen`).
    pub(crate) async fn start_interactive(
        bin: &str,
        links: Vec<DevLink>,
        name: &str,
    ) -> Result<Self> {
        let mut path = Self::prepare(bin, links, &[])?;
        let addr = format!("127.0.0.1:{}", comsat_tests::free_udp_port()?).parse()?;
        path.layout
            .put_link_on_interactive_listener(name, "interactive", 0, addr)?;
        path.start_relay("relay")?;
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Like [`Path::start`], with the relay's interactive listener and a
    /// lane to it for every link (as a relay enrolled with
    /// `--interactive-port` gives them): flows start on the lane and move
    /// to the main connection when they turn bulk.
    pub(crate) async fn start_lanes(bin: &str, links: Vec<DevLink>) -> Result<Self> {
        let mut path = Self::prepare(bin, links, &[])?;
        let addr = format!("127.0.0.1:{}", comsat_tests::free_udp_port()?).parse()?;
        path.layout.run_lanes(0, addr)?;
        path.start_relay("relay")?;
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Like [`Path::start`], with a lane for every link to the relay's main
    /// listener, as the controller gives links of a relay enrolled without
    /// `--interactive-port` (the relay has no interactive listener).
    pub(crate) async fn start_lanes_on_main(bin: &str, links: Vec<DevLink>) -> Result<Self> {
        let mut path = Self::prepare(bin, links, &[])?;
        path.layout.run_lanes_on_main(0)?;
        path.start_relay("relay")?;
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Like [`Path::start`], with one relay per link: each link rides its
    /// own QUIC connection from the same two agents, through its own relay.
    pub(crate) async fn start_split(bin: &str, links: Vec<DevLink>) -> Result<Self> {
        let names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
        let extra = names.len().saturating_sub(1);
        let mut path = Self::prepare_relays(bin, links, &[], extra, Ipv4Addr::LOCALHOST.into())?;
        for (i, name) in names.iter().enumerate() {
            path.layout.keep_link_on_relay(name, i)?;
        }
        path.start_relay("relay")?;
        for (i, r) in path.layout.relays.iter().enumerate().skip(1) {
            let (relay, _, _) = proc::start_relay(
                &path.bin,
                &r.config,
                path.dir.path(),
                &format!("relay-{}", i + 1),
            )?;
            path.more_relays.push(relay);
        }
        path.start_agent_b()?;
        path.start_agent_a().await?;
        Ok(path)
    }

    /// Starts (or restarts, after a kill) the relay; its log is `NAME.log`.
    pub(crate) fn start_relay(&mut self, name: &str) -> Result<()> {
        let (relay, _, admin) =
            proc::start_relay(&self.bin, &self.layout.relay_config, self.dir.path(), name)?;
        self.relay = Some(relay);
        self.relay_admin = Some(admin);
        Ok(())
    }

    pub(crate) fn start_agent_b(&mut self) -> Result<()> {
        let (b, _) = proc::start_agent(
            &self.bin,
            &self.layout.agent_b.config,
            self.dir.path(),
            "agent-b",
        )?;
        self.agent_b = Some(b);
        Ok(())
    }

    /// Starts agent A and waits until it reports ready (every link
    /// attached at the relay).
    pub(crate) async fn start_agent_a(&mut self) -> Result<()> {
        let (mut a, admin) = proc::start_agent(
            &self.bin,
            &self.layout.agent_a.config,
            self.dir.path(),
            "agent-a",
        )?;
        self.listen.clear();
        for (name, _) in &self.layout.links {
            self.listen.push(proc::listen_addr(&mut a, name)?);
        }
        let deadline = Instant::now() + proc::START_TIMEOUT;
        while !matches!(proc::http_get(admin, "/readyz"), Ok((200, _))) {
            if Instant::now() > deadline {
                bail!("comsat path not ready; agent log:\n{}", a.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.agent_a = Some(a);
        Ok(())
    }

    /// The relay's `/metrics`.
    pub(crate) fn relay_metrics(&self) -> Result<String> {
        match self.relay_admin {
            Some(admin) => comsat_tests::scrape(admin),
            None => bail!("the relay is not running"),
        }
    }

    /// PIDs of the relay, agent A and agent B (those running).
    pub(crate) fn pids(&self) -> Vec<u32> {
        [&self.relay, &self.agent_a, &self.agent_b]
            .into_iter()
            .flatten()
            .map(Proc::pid)
            .collect()
    }

    pub(crate) fn relay_pid(&self) -> Result<u32> {
        match &self.relay {
            Some(r) => Ok(r.pid()),
            None => bail!("the relay is not running"),
        }
    }

    /// The relay's config file.
    pub(crate) fn relay_config(&self) -> PathBuf {
        self.layout.relay_config.clone()
    }
}
