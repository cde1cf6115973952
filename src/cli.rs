//! The command line: every command, its arguments and their parsers.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// comsat: a relay-based secure interconnect broker.
///
/// Edge agents dial out over QUIC to relays; relays authenticate and pair
/// the two sides of each link and forward their end-to-end encrypted flows.
#[derive(Parser, Debug)]
#[command(name = "comsat", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the whole system locally in one process: a controller, a relay
    /// and two agents on loopback, enrolled with join tokens, plus a demo
    /// service and link. Ctrl-C stops it; a second run reuses DIR.
    #[cfg(feature = "server")]
    Up(UpArgs),
    /// Run a relay.
    #[cfg(feature = "server")]
    Relay {
        #[command(subcommand)]
        command: RelayCommand,
    },
    /// Run an edge agent.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The control plane: enrolment, links, grants.
    #[cfg(feature = "server")]
    Controller {
        #[command(subcommand)]
        command: ControllerCommand,
    },
    /// Operate a controller: join tokens, agents, relays, links.
    Ctl(Box<CtlArgs>),
    /// Print a shell completion script, e.g.
    /// `comsat completions bash > /etc/bash_completion.d/comsat`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Development helpers.
    #[cfg(feature = "server")]
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

impl Command {
    /// Whether it talks to a person (`up`, `ctl`): only warnings unless asked.
    pub(crate) fn quiet(&self) -> bool {
        match self {
            #[cfg(feature = "server")]
            Self::Up(_) => true,
            Self::Ctl(_) => true,
            _ => false,
        }
    }
}

#[cfg(feature = "server")]
#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    /// Where the controller, relay and agents keep their state.
    #[arg(long, default_value = ".comsat", env = "COMSAT_DATA_DIR")]
    pub(crate) data_dir: PathBuf,
    /// The controller's HTTPS port on 127.0.0.1 (first run only).
    #[arg(long, default_value_t = 8443)]
    pub(crate) controller_port: u16,
    /// The relay's QUIC (UDP) port on 127.0.0.1 (first run only).
    #[arg(long, default_value_t = 4433)]
    pub(crate) relay_port: u16,
    /// The relay's interactive listener (UDP) on 127.0.0.1, for links
    /// created with `--connection` (first run only).
    #[arg(long, default_value_t = 4434)]
    pub(crate) relay_interactive_port: u16,
    /// Where the demo link listens.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub(crate) demo_listen: SocketAddr,
    /// Start only the infrastructure: no demo service, no demo link.
    #[arg(long)]
    pub(crate) no_demo: bool,
}

#[cfg(feature = "server")]
#[derive(Subcommand, Debug)]
pub(crate) enum ControllerCommand {
    /// Create a controller's data dir: authority key, CA and server
    /// certificate (or yours), database, admin token, ctl context.
    Init {
        /// Directory to create (must not hold a controller yet).
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// The URL nodes and operators reach the controller at; it goes
        /// into join tokens and the server certificate.
        #[arg(long, default_value = "https://127.0.0.1:8443")]
        public_url: String,
        /// Your server certificate chain (PEM) instead of a generated CA.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The CA that issued --tls-cert (PEM), pinned by nodes; default:
        /// the last certificate of the chain.
        #[arg(long, requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
        /// The SPIFFE trust domain of relays' and agents' IDs (default: the
        /// host of --public-url if it is a DNS name, else comsat.internal).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Your root CA (PEM): the relay CA becomes an intermediate under
        /// it, from a CSR (relay-ca.csr) you sign where the root's key is.
        #[arg(long)]
        upstream_ca: Option<PathBuf>,
        /// Keep state in this PostgreSQL database
        /// (postgres://USER:PASSWORD@HOST:PORT/DB) instead of the SQLite
        /// file in the data dir; it must be empty. Prefer the environment
        /// variable: a command line is visible to other users.
        #[arg(long, env = "COMSAT_DATABASE_URL", hide_env_values = true, value_parser = comsat_controller::store::DatabaseUrl::parse)]
        database: Option<comsat_controller::store::DatabaseUrl>,
    },
    /// Serve the controller API from an initialised data dir.
    Run {
        /// The data dir `controller init` created.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on (default: from controller.toml).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The PostgreSQL database this controller shares with others
        /// (postgres://USER:PASSWORD@HOST:PORT/DB); default: the SQLite
        /// file in the data dir. Prefer the environment variable.
        #[arg(long, env = "COMSAT_DATABASE_URL", hide_env_values = true, value_parser = comsat_controller::store::DatabaseUrl::parse)]
        database: Option<comsat_controller::store::DatabaseUrl>,
    },
}

/// What `relay run` and `agent run` take for an enrolled data dir.
#[derive(Args, Debug)]
pub(crate) struct NodeRunArgs {
    /// The data dir `comsat relay enrol` or `comsat agent enrol` wrote.
    #[arg(
        long,
        env = "COMSAT_DATA_DIR",
        conflicts_with = "config",
        required_unless_present = "config"
    )]
    pub(crate) data_dir: Option<PathBuf>,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, requires = "data_dir")]
    pub(crate) admin: Option<SocketAddr>,
    /// Niceness the main threads take above the process's own while bulk
    /// and interactive work are apart: a relay's interactive listener
    /// runs, an agent's link has a lane (0 to 19, default 5; 0: the same).
    #[arg(long, requires = "data_dir", value_parser = clap::value_parser!(u8).range(0..=19))]
    pub(crate) bulk_nice: Option<u8>,
}

#[cfg(feature = "server")]
#[derive(Subcommand, Debug)]
pub(crate) enum RelayCommand {
    /// Serve agents: from an enrolled data dir (grants pushed by the
    /// controller), or as configured in a relay.toml.
    Run {
        #[command(flatten)]
        node: NodeRunArgs,
        /// UDP address to serve QUIC on (default: all addresses, at the
        /// enrolled public address's port).
        #[arg(long, requires = "data_dir")]
        listen: Option<SocketAddr>,
        /// UDP address of the interactive listener (default: the listen
        /// address's IP at the enrolled interactive port; for a relay
        /// enrolled with `--interactive-port` behind a port forward).
        #[arg(long, requires = "data_dir")]
        interactive_listen: Option<SocketAddr>,
        /// A static relay config file (see `comsat dev init`).
        #[arg(long, env = "COMSAT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// On SIGTERM, how long to wait for attached links to move to
        /// their next relay before exiting anyway (default: the config's
        /// `[drain] grace_secs`, else 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        drain_grace: Option<std::time::Duration>,
    },
    /// Drain a running relay: it refuses new attaches, moves every link to
    /// the next relay of its grant, and exits (what SIGTERM does); this
    /// waits until it has exited.
    Drain {
        /// The relay's data dir (or the directory of its config file).
        #[arg(
            long,
            env = "COMSAT_DATA_DIR",
            conflicts_with = "config",
            required_unless_present = "config"
        )]
        data_dir: Option<PathBuf>,
        /// The relay's static config file.
        #[arg(long, env = "COMSAT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Give up waiting after this long (the relay keeps draining).
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Enrol this machine as a relay with a join token.
    Enrol {
        #[command(flatten)]
        token: TokenArgs,
        /// Directory for the relay's keys, certificate and grant cache.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
        /// HOST:PORT agents dial (UDP); HOST goes into the certificate.
        #[arg(long)]
        public_addr: String,
        /// Also run an interactive listener on this UDP port (same host):
        /// agents' lanes, and links created with `--connection`, reach it
        /// over a QUIC connection and a relay thread of their own (without
        /// it, lanes go to the main port). Open the port too.
        #[arg(long, value_name = "PORT")]
        interactive_port: Option<u16>,
        #[command(flatten)]
        own_cert: comsat_node::state::OwnCert,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AgentCommand {
    /// Join links: those the controller assigns to an enrolled data dir,
    /// or those configured in an agent.toml.
    Run {
        #[command(flatten)]
        node: NodeRunArgs,
        #[command(flatten)]
        tuning: AgentTuning,
        /// A static agent config file (see `comsat dev init`).
        #[arg(long, env = "COMSAT_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Enrol this machine as an agent with a join token.
    Enrol {
        #[command(flatten)]
        token: TokenArgs,
        /// Directory for the agent's keys and state.
        #[arg(long, env = "COMSAT_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    /// The join token (prefer --token-file: a command line is visible to
    /// every user of the machine).
    pub(crate) token: Option<String>,
    /// File holding the join token; `-` reads standard input.
    #[arg(long, conflicts_with = "token")]
    pub(crate) token_file: Option<PathBuf>,
    /// Another controller sharing the first one's database (https://…),
    /// tried when the token's one cannot be reached (repeatable).
    #[arg(long = "fallback-controller")]
    pub(crate) fallback_controllers: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct CtlArgs {
    /// Controller URL.
    #[arg(long, env = "COMSAT_CONTROLLER", global = true)]
    pub(crate) controller: Option<String>,
    /// File holding the admin API token.
    #[arg(long, env = "COMSAT_TOKEN_FILE", global = true)]
    pub(crate) token_file: Option<PathBuf>,
    /// The controller CA (PEM).
    #[arg(long, env = "COMSAT_CA", global = true)]
    pub(crate) ca: Option<PathBuf>,
    /// A context file written by `controller init` (default
    /// ./.comsat/context.toml when it exists).
    #[arg(long, env = "COMSAT_CONTEXT", global = true)]
    pub(crate) context: Option<PathBuf>,
    /// Output format (`yaml`: only for `get`, which prints YAML by default).
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub(crate) output: OutputFormat,
    #[command(subcommand)]
    pub(crate) command: CtlCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub(crate) enum CtlCommand {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Enrolled relays.
    Relay {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Links between two agents.
    Link {
        #[command(subcommand)]
        command: LinkCommand,
    },
    /// A summary of the controller's state.
    Status,
    /// The audit log: changes and refused authentications, with reasons.
    Audit {
        #[command(subcommand)]
        command: comsat_node::ctl::log::AuditCommand,
    },
    /// The flow log: each flow's caller, bytes and outcome, as its agents report it.
    Flows(comsat_node::ctl::log::FlowsArgs),
    /// Bundles of the trust domains the controller federates with.
    #[command(subcommand)]
    Bundle(comsat_node::ctl::bundle::BundleCommand),
    /// Service accounts (automation) and their API tokens.
    #[command(name = "serviceaccount")]
    ServiceAccount {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Users (people) and their API tokens.
    User {
        #[command(subcommand)]
        command: PrincipalCommand,
    },
    /// Roles: rules of resources and verbs.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Role bindings: roles given to users and service accounts.
    #[command(name = "rolebinding")]
    RoleBinding {
        #[command(subcommand)]
        command: RoleBindingCommand,
    },
    /// Make the controller hold what a YAML file describes (Link, Role,
    /// RoleBinding, ServiceAccount, JoinToken); applying twice changes
    /// nothing the second time.
    Apply {
        /// The file (`-`: standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print an object as the YAML document `apply` takes (`-o json` for
    /// JSON).
    Get {
        /// link, role, rolebinding or serviceaccount.
        kind: String,
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PrincipalCommand {
    /// Create one with its first API token; prints only the token.
    Create {
        /// Its name.
        name: String,
        /// Lifetime of the token, e.g. 30d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List them with their tokens' ids (never the tokens).
    List,
    /// Delete one: its tokens stop working and its bindings go.
    Delete {
        /// Its name.
        name: String,
    },
    /// Issue another API token; prints only the token.
    Token {
        /// Its name.
        name: String,
        /// Lifetime of the token, e.g. 30d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Revoke one API token (see `list` for ids).
    Revoke {
        /// Its name.
        name: String,
        /// The token's id.
        #[arg(long)]
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RoleCommand {
    /// Create a role.
    Create {
        /// Its name.
        name: String,
        /// A rule, RESOURCES:VERBS (comma-separated; `*` for all), e.g.
        /// `links,tokens/agent:get,list,create` (repeatable).
        #[arg(long = "rule", required = true)]
        rules: Vec<String>,
    },
    /// List roles, built-in ones included.
    List,
    /// Show one role's rules.
    Show {
        /// Its name.
        name: String,
    },
    /// Delete a role (not a built-in one).
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RoleBindingCommand {
    /// Give a role to a service account or a user.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["serviceaccount", "user"])))]
    Create {
        /// The binding's name.
        name: String,
        /// The role.
        #[arg(long)]
        role: String,
        /// A service account.
        #[arg(long)]
        serviceaccount: Option<String>,
        /// A user.
        #[arg(long)]
        user: Option<String>,
    },
    /// List role bindings.
    List,
    /// Delete a role binding.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create a one-time join token; prints only the token.
    Create {
        /// What the token enrols.
        #[arg(long, value_parser = ["agent", "relay"])]
        kind: String,
        /// The name the node gets (default: one the controller picks).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 10m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ListCommand {
    /// List them.
    List,
    /// Decommission one: its credentials stop working at once (an agent
    /// must hold no link; a relay's links move to other relays).
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum LinkCommand {
    /// Create a link: FROM listens locally, TO dials the target.
    Create(LinkCreateArgs),
    /// Change the limits relays enforce on a link (the others stay); open
    /// flows go on.
    #[command(group(clap::ArgGroup::new("limits").required(true).multiple(true).args(["max_flows", "unlimited_flows", "rate_limit", "unlimited_rate", "connection", "shared_connection"])))]
    Update {
        /// The link's name.
        name: String,
        /// Concurrent flows the relays allow the link.
        #[arg(long, conflicts_with = "unlimited_flows")]
        max_flows: Option<u32>,
        /// Remove the concurrent-flow limit.
        #[arg(long)]
        unlimited_flows: bool,
        /// Bytes per second per direction, like 10MiB/s or 100Mbit/s;
        /// applies to open flows too.
        #[arg(long, value_parser = comsat_node::ctl::parse_rate, conflicts_with = "unlimited_rate")]
        rate_limit: Option<u64>,
        /// Remove the rate limit.
        #[arg(long)]
        unlimited_rate: bool,
        /// Move the link onto the agents' connection NAME (see `create
        /// --connection`); its open flows are reset.
        #[arg(long, value_name = "NAME", conflicts_with = "shared_connection")]
        connection: Option<String>,
        /// Move the link back onto the agents' shared connection; its open
        /// flows are reset.
        #[arg(long)]
        shared_connection: bool,
    },
    /// List links.
    List,
    /// Show one link.
    Show {
        /// The link's name.
        name: String,
    },
    /// Delete a link: listeners close, open flows are reset, relays drop it.
    Delete {
        /// The link's name.
        name: String,
    },
}

#[cfg(feature = "server")]
#[derive(Subcommand, Debug)]
pub(crate) enum DevCommand {
    /// Write a local setup: authority, CA, a relay, two agents, grants.
    Init(DevInit),
}

#[cfg(feature = "server")]
#[derive(Args, Debug)]
pub(crate) struct DevInit {
    /// Directory to create the setup in.
    #[arg(long, default_value = ".comsat-dev")]
    pub(crate) dir: PathBuf,
    /// The relay's QUIC address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub(crate) relay_listen: SocketAddr,
    /// The relay's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9101")]
    pub(crate) relay_admin: SocketAddr,
    /// Agent A's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9201")]
    pub(crate) agent_a_admin: SocketAddr,
    /// Agent B's admin HTTP address.
    #[arg(long, default_value = "127.0.0.1:9202")]
    pub(crate) agent_b_admin: SocketAddr,
    /// A link as NAME,LISTEN,TARGET (repeatable), e.g.
    /// `demo,tcp://127.0.0.1:7000,tcp://127.0.0.1:9000`.
    #[arg(long = "link", value_parser = parse_link)]
    pub(crate) links: Vec<comsat_controller::dev::DevLink>,
    /// Agents pin the relay certificate by SHA-256 instead of by CA.
    #[arg(long)]
    pub(crate) pin_sha256: bool,
    /// A backup relay as QUIC_ADDR[,ADMIN_ADDR] (repeatable): links name
    /// every relay in order, and agents fail over to the next.
    #[arg(long = "extra-relay", value_parser = parse_extra_relay)]
    pub(crate) extra_relays: Vec<(SocketAddr, Option<SocketAddr>)>,
}

#[cfg(feature = "server")]
fn parse_extra_relay(s: &str) -> Result<(SocketAddr, Option<SocketAddr>), String> {
    let (quic, admin) = match s.split_once(',') {
        Some((q, a)) => (q, Some(a)),
        None => (s, None),
    };
    let quic = quic
        .parse()
        .map_err(|_| format!("`{quic}`: expected IP:PORT"))?;
    let admin = admin
        .map(|a| a.parse().map_err(|_| format!("`{a}`: expected IP:PORT")))
        .transpose()?;
    Ok((quic, admin))
}

#[cfg(feature = "server")]
fn parse_link(s: &str) -> Result<comsat_controller::dev::DevLink, String> {
    let parts: Vec<&str> = s.splitn(3, ',').collect();
    let [name, listen, target] = parts[..] else {
        return Err("expected NAME,LISTEN,TARGET".into());
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("link name `{name}`: use letters, digits, - and _"));
    }
    Ok(comsat_controller::dev::DevLink {
        name: name.into(),
        listen: listen.into(),
        target: target.into(),
        allowed_uids: vec![],
        allow: vec![],
        proxy_protocol: false,
    })
}

/// `comsat ctl link create`.
#[derive(Args, Debug)]
pub(crate) struct LinkCreateArgs {
    /// The link's name (lowercase letters, digits, `-`).
    name: String,
    /// The agent that listens.
    #[arg(long)]
    from: String,
    /// Where it listens: tcp://127.0.0.1:PORT or unix:///PATH.
    #[arg(long)]
    listen: String,
    /// The agent that dials the target.
    #[arg(long)]
    to: String,
    /// What it dials: tcp://HOST:PORT or unix:///PATH.
    #[arg(long)]
    target: String,
    /// Unix listeners: a peer uid allowed to connect (repeatable).
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Unix listeners: a peer gid allowed to connect (repeatable).
    #[arg(long = "allow-gid")]
    allow_gids: Vec<u32>,
    /// Admit callers with these selectors, like "[SPIFFE-ID] unix:path:/usr/bin/psql unix:uid:1000" (repeatable).
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Start each target connection with a PROXY v2 header naming the caller.
    #[arg(long)]
    proxy_protocol: bool,
    /// Concurrent flows the relays allow the link (default: no limit);
    /// one more is reset and counted.
    #[arg(long)]
    max_flows: Option<u32>,
    /// Bytes per second the relays let the link carry in each
    /// direction, like 10MiB/s or 100Mbit/s (default: no limit); the
    /// sender is slowed, nothing is dropped.
    #[arg(long, value_parser = comsat_node::ctl::parse_rate)]
    rate_limit: Option<u64>,
    /// Give the link a QUIC connection and a thread of its own on both
    /// agents (and the relays' interactive listener where they run
    /// one), so its round trips do not wait behind bulk links. Links
    /// naming the same connection share it.
    #[arg(long, value_name = "NAME")]
    connection: Option<String>,
}

impl From<LinkCreateArgs> for comsat_protocol::api::LinkSpec {
    fn from(a: LinkCreateArgs) -> Self {
        Self {
            name: a.name,
            from: a.from,
            listen: a.listen,
            to: a.to,
            target: a.target,
            allowed_uids: a.allow_uids,
            allowed_gids: a.allow_gids,
            allow: a.allow,
            proxy_protocol: a.proxy_protocol,
            max_flows: a.max_flows,
            rate_limit_bytes_per_sec: a.rate_limit,
            connection: a.connection,
        }
    }
}

/// How an enrolled agent's links behave (a static config sets the same in
/// its file).
#[derive(Args, Debug, Default)]
pub(crate) struct AgentTuning {
    /// How long an open flow waits for its link to come back after an
    /// outage (the relay gone, the uplink down) before its application
    /// sees a reset: 1s to 1h, default 30s. A static config sets
    /// `flow_timeout_ms` instead.
    #[arg(long, requires = "data_dir", value_parser = parse_flow_timeout)]
    pub(crate) flow_timeout: Option<std::time::Duration>,
    /// How often an idle relay connection sends a keep-alive: shorter than
    /// the NAT in front of this machine keeps an idle UDP binding, 1s to
    /// 5m, default 25s. A static config sets `keep_alive_ms` instead.
    #[arg(long, requires = "data_dir", value_parser = parse_keep_alive)]
    pub(crate) keep_alive: Option<std::time::Duration>,
}

impl AgentTuning {
    /// Sets what was given on `config`.
    pub(crate) fn apply(&self, config: &mut comsat_agent::AgentConfig) {
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        config.flow_timeout_ms = self.flow_timeout.map(ms);
        config.keep_alive_ms = self.keep_alive.map(ms);
    }
}

/// A duration of `text` within `range`, said as `what` if not.
fn parse_duration_within(
    text: &str,
    range: std::ops::RangeInclusive<std::time::Duration>,
    what: &str,
) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if !range.contains(&d) {
        return Err(format!("{text} is outside {what}"));
    }
    Ok(d)
}

/// `--flow-timeout`: a duration from 1 s to 1 h.
fn parse_flow_timeout(text: &str) -> Result<std::time::Duration, String> {
    let secs = std::time::Duration::from_secs;
    parse_duration_within(text, secs(1)..=secs(3600), "1s to 1h")
}

/// `--keep-alive`: a duration from 1 s to 5 min.
fn parse_keep_alive(text: &str) -> Result<std::time::Duration, String> {
    parse_duration_within(text, comsat_agent::defaults::KEEP_ALIVE_RANGE, "1s to 5m")
}
