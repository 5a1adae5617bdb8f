//! The command line. Every flag can also come from `RUSTOVERLAY_<FLAG>`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::Ipv4Network;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "rustoverlay",
    version,
    about = "Docker network and IPAM plugin: multi-host VXLAN overlays on a shared store"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve Docker's NetworkDriver and IpamDriver APIs on the plugin socket.
    Serve(ServeArgs),
    /// Print every key of the store under rustoverlay's prefix (for
    /// operators and tests). The embedded store can only be read while the
    /// plugin that owns it is stopped.
    Dump(DumpArgs),
    /// List addresses bound to no endpoint and everything held by hosts that
    /// are gone (unregistered); free the addresses with --apply (and the gone
    /// hosts' holdings with --apply --gone-hosts). Safe at any time without
    /// --gone-hosts: nothing of a host is reclaimed, and young addresses are
    /// left alone.
    Gc(GcArgs),
    /// Show the cluster as the store sees it: hosts (alive or gone),
    /// overlays with their networks, endpoints per host and pool usage, and
    /// whether this host's kernel is in step with the store.
    ///
    /// Examples:
    ///   rustoverlay status                      # through this host's plugin
    ///   rustoverlay status --json | jq .cluster.hosts
    ///   rustoverlay status --from-store --store etcd://10.0.0.5:2379
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// Check this host: privileges, kernel, underlay and MTU, the store, the
    /// registration, the VXLAN path (UDP 4789) to every live host, firewall
    /// rules, clocks, Docker. Each check prints ok, warn or FAIL with a fix.
    /// Exit status 0: all ok; 1: warnings; 2: a failure.
    ///
    /// Examples:
    ///   rustoverlay doctor
    ///   rustoverlay doctor --store etcd://10.0.0.5:2379 --docker-config /etc/docker/daemon.json
    #[command(verbatim_doc_comment)]
    Doctor(DoctorArgs),
}

/// Where `status` and `doctor` ask the running plugin.
#[derive(Debug, Args)]
pub struct PluginSocketArgs {
    /// The running plugin's socket (a managed plugin's is found under
    /// /run/docker/plugins/<id>/ when this one is missing). The plugin reads
    /// its store (the only way into the embedded store, which it locks) and
    /// checks this host's kernel against it.
    #[arg(
        long,
        env = "RUSTOVERLAY_SOCKET",
        default_value = "/run/docker/plugins/rustoverlay.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub plugin: PluginSocketArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// This host's ID (default: the running plugin's, else the hostname).
    #[arg(long, env = "RUSTOVERLAY_HOST_ID")]
    pub host_id: Option<String>,
    /// This host's VTEP (default: the running plugin's, else the address
    /// of the default route's interface).
    #[arg(long, env = "RUSTOVERLAY_VTEP_IP")]
    pub vtep_ip: Option<Ipv4Addr>,
    /// The local Docker API.
    #[arg(
        long,
        env = "RUSTOVERLAY_DOCKER_SOCKET",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_socket: String,
    /// dockerd's configuration file, where names across hosts need the
    /// resolver as `dns`.
    #[arg(long, default_value = "/etc/docker/daemon.json")]
    pub docker_config: PathBuf,
    /// The plugin's resolver address (its --dns-address).
    #[arg(long, env = "RUSTOVERLAY_DNS_ADDRESS", default_value = "169.254.53.53")]
    pub dns_address: Ipv4Addr,
    /// How long to wait for each peer's answer over VXLAN, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub probe_window: f64,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub plugin: PluginSocketArgs,
    /// Read the store given by --store directly, without the plugin (from a
    /// machine that runs none, or while it is down): no kernel check. Also
    /// used when the plugin does not answer and the store is etcd or Consul.
    #[arg(long)]
    pub from_store: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print the report as JSON (stable: fields are only ever added).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Free what is listed.
    #[arg(long)]
    pub apply: bool,
    /// Only addresses that stay bound to no endpoint, unchanged, for this
    /// many seconds while gc watches (gc waits this long; 0: no wait).
    #[arg(long, default_value_t = 60)]
    pub min_age: u64,
    /// With --apply, also reclaim hosts that are not registered, at once.
    /// Only for machines gone for good: a plugin that is down or restarting
    /// is not registered either (the cluster's reaper waits --reclaim-grace).
    #[arg(long)]
    pub gone_hosts: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people (colours only on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where the log goes.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    /// For a managed plugin: dockerd files a plugin's stdout under
    /// level=info and its stderr under level=error.
    Stdout,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store: file:///path (embedded, one host), etcd://host:2379[,host:2379...]
    /// or consul://host:8500 (shared by many hosts), memory:// (tests).
    #[arg(
        long,
        env = "RUSTOVERLAY_STORE",
        default_value = "file:///var/lib/rustoverlay/state.redb"
    )]
    pub store: String,
    /// CA certificate that signed the store's server certificate (turns TLS on).
    #[arg(long, env = "RUSTOVERLAY_STORE_CA")]
    pub store_ca: Option<PathBuf>,
    /// Client certificate for the store (with --store-key).
    #[arg(long, env = "RUSTOVERLAY_STORE_CERT")]
    pub store_cert: Option<PathBuf>,
    /// Client key for the store (with --store-cert).
    #[arg(long, env = "RUSTOVERLAY_STORE_KEY")]
    pub store_key: Option<PathBuf>,
    /// User name for the store's authentication. Read from the environment
    /// only (RUSTOVERLAY_STORE_USER), like the password, so neither shows in `ps`.
    #[arg(skip = std::env::var("RUSTOVERLAY_STORE_USER").ok().filter(|u| !u.is_empty()))]
    pub store_user: Option<String>,
    /// Password (RUSTOVERLAY_STORE_PASSWORD, environment only).
    #[arg(skip = std::env::var("RUSTOVERLAY_STORE_PASSWORD").ok())]
    pub store_password: Option<String>,
    /// Consul ACL token (RUSTOVERLAY_CONSUL_TOKEN, environment only).
    #[arg(skip = std::env::var("RUSTOVERLAY_CONSUL_TOKEN").ok().filter(|t| !t.is_empty()))]
    pub consul_token: Option<String>,
    /// The Consul servers' session_ttl_min, in seconds: shorter lease TTLs
    /// are raised to it.
    #[arg(long, env = "RUSTOVERLAY_CONSUL_SESSION_TTL_MIN", default_value_t = 10)]
    pub consul_session_ttl_min: u64,
    /// Time limit of every store call, in seconds.
    #[arg(long, env = "RUSTOVERLAY_STORE_TIMEOUT", default_value_t = 5.0)]
    pub store_timeout: f64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket Docker finds the plugin at.
    #[arg(
        long,
        env = "RUSTOVERLAY_SOCKET",
        default_value = "/run/docker/plugins/rustoverlay.sock"
    )]
    pub socket: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// This host's name in the cluster (default: the hostname).
    #[arg(long, env = "RUSTOVERLAY_HOST_ID")]
    pub host_id: Option<String>,
    /// The IPv4 address other hosts reach this one at (default: the address of
    /// the interface that holds the default route).
    #[arg(long, env = "RUSTOVERLAY_VTEP_IP")]
    pub vtep_ip: Option<Ipv4Addr>,
    /// Where networks created without --subnet get their subnet from.
    #[arg(
        long,
        env = "RUSTOVERLAY_DEFAULT_POOL",
        default_value = "10.200.0.0/16"
    )]
    pub default_pool: Ipv4Network,
    /// Prefix length of subnets taken from the default pool.
    #[arg(long, env = "RUSTOVERLAY_DEFAULT_POOL_SIZE", default_value_t = 24)]
    pub default_pool_size: u8,
    /// Seconds a host stays registered after its plugin stops renewing.
    #[arg(long, env = "RUSTOVERLAY_HOST_TTL", default_value_t = 10)]
    pub host_ttl: u64,
    /// Seconds a gone host's endpoints and addresses are kept before another
    /// host reclaims them.
    #[arg(long, env = "RUSTOVERLAY_RECLAIM_GRACE", default_value_t = 300)]
    pub reclaim_grace: u64,
    /// Seconds after which this host's endpoint without a bridge port (its
    /// container removed while the store was unreachable) is removed and its
    /// addresses freed.
    #[arg(long, env = "RUSTOVERLAY_ORPHAN_AGE", default_value_t = 600)]
    pub orphan_age: u64,
    /// Seconds an overlay's devices (namespace, bridge, VXLAN device, peer
    /// entries and watch) stay after this host's last container on it left,
    /// so that the next container attaches without building them again. 0
    /// removes them with the last container; removing the network removes
    /// them at once.
    #[arg(long, env = "RUSTOVERLAY_LINGER", default_value_t = 60)]
    pub linger: u64,
    /// Runtime state (the overlays' network namespaces).
    #[arg(
        long,
        env = "RUSTOVERLAY_STATE_DIR",
        default_value = "/run/rustoverlay"
    )]
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9653
    /// (off when not given). The managed plugin runs in the host's network:
    /// the address is the host's.
    #[arg(long, env = "RUSTOVERLAY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Time limit of one Docker request, in seconds.
    #[arg(long, env = "RUSTOVERLAY_REQUEST_TIMEOUT", default_value_t = 25.0)]
    pub request_timeout: f64,
    /// Log lines as text or as JSON objects (the filter is RUSTOVERLAY_LOG,
    /// e.g. info or info,rustoverlay=debug). Text has ANSI colours only when
    /// the log goes to a terminal and NO_COLOR is unset.
    #[arg(long, env = "RUSTOVERLAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Where the log goes. A fatal error also goes to stderr, as text
    /// (unless the log itself is JSON on stderr).
    #[arg(long, env = "RUSTOVERLAY_LOG_TARGET", value_enum, default_value_t = LogTarget::Stderr)]
    pub log_target: LogTarget,
    #[command(flatten)]
    pub dns: DnsArgs,
}

/// Names across hosts: the resolver and where it learns names.
#[derive(Debug, Clone, Args)]
pub struct DnsArgs {
    /// Turn the resolver and name publishing off (containers then find
    /// only their own host's containers by name).
    #[arg(long, env = "RUSTOVERLAY_NO_DNS")]
    pub no_dns: bool,
    /// The resolver's address in every container on our overlays and on the
    /// host; give dockerd `--dns` with it (daemon.json "dns").
    #[arg(long, env = "RUSTOVERLAY_DNS_ADDRESS", default_value = "169.254.53.53")]
    pub dns_address: Ipv4Addr,
    /// Where names that are not on an overlay go (IP or IP:PORT, repeatable
    /// or comma-separated); default: the host's resolv.conf.
    #[arg(long, env = "RUSTOVERLAY_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// TTL of the resolver's own answers, in seconds.
    #[arg(long, env = "RUSTOVERLAY_DNS_TTL", default_value_t = 2)]
    pub dns_ttl: u32,
    /// Interfaces besides loopback and Docker's bridges whose traffic the
    /// host's resolver answers (repeatable or comma-separated).
    #[arg(long, env = "RUSTOVERLAY_DNS_INTERFACE", value_delimiter = ',')]
    pub dns_interface: Vec<String>,
    /// The host's resolv.conf, for the upstreams.
    #[arg(
        long,
        env = "RUSTOVERLAY_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: PathBuf,
    /// systemd-resolved's list of upstreams, used when resolv.conf names
    /// only its stub (127.0.0.53).
    #[arg(
        long,
        env = "RUSTOVERLAY_RESOLVED_CONF",
        default_value = "/run/systemd/resolve/resolv.conf"
    )]
    pub resolved_conf: PathBuf,
    /// The local Docker engine's API, for container names.
    #[arg(
        long,
        env = "RUSTOVERLAY_DOCKER_SOCKET",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_socket: String,
}

/// `IP` (port 53) or `IP:PORT` (`[v6]:PORT` for IPv6).
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only keys under this part of the schema (e.g. "ipam/").
    #[arg(long, default_value = "")]
    pub prefix: String,
}
