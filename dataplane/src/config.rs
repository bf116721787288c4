//! Command-line flags (each also readable from a `PORTCULLIS_*` environment variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use portcullis_operator::Tenancy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn failure_policy(text: &str) -> Result<portcullis_crds::v1alpha1::FailurePolicy, String> {
    use portcullis_crds::v1alpha1::FailurePolicy;
    match text {
        "local" => Ok(FailurePolicy::Local),
        "open" => Ok(FailurePolicy::Open),
        "closed" => Ok(FailurePolicy::Closed),
        other => Err(format!("{other:?} is not one of local, open, closed")),
    }
}

/// The longest any of the flags in seconds may be: a day. Every one is added to the clock, which
/// a value near `Duration::MAX` would overflow (a panic at the first request, not at start).
const MAX_SECONDS: f64 = 86_400.0;

fn seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs > MAX_SECONDS {
        return Err(format!("{text} is more than a day ({MAX_SECONDS} seconds)"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "portcullis-dataplane",
    version,
    about = "Portcullis data plane: authenticates, limits, routes and meters LLM API traffic"
)]
pub struct DataplaneArgs {
    /// Local mode: serve the Kubernetes manifests (ApiKey, ProviderCredential, KillSwitch,
    /// Secret) in this folder and reload when they change.
    #[arg(long, env = "PORTCULLIS_MANIFESTS", value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Local mode: a namespace whose ProviderCredentials and KillSwitches reach the ApiKeys of
    /// every namespace, as the operator's own namespace does in a cluster (repeat the flag, or
    /// separate with commas). Those in any other namespace then apply only to their own
    /// namespace's keys. Unset (or `*`): every namespace in the folder is trusted.
    #[arg(
        long,
        env = "PORTCULLIS_PLATFORM_NAMESPACES",
        value_name = "NAMESPACE",
        value_delimiter = ',',
        requires = "manifests"
    )]
    pub platform_namespace: Vec<String>,

    /// Address for API traffic.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain: serve HTTPS on --listen. Read again when it changes (a renewal
    /// needs no restart).
    #[arg(long, env = "PORTCULLIS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "PORTCULLIS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Seconds between checks of --tls-cert and --tls-key for a renewed pair; one that does not
    /// load leaves the previous pair serving.
    #[arg(long, value_parser = seconds, default_value = "10")]
    pub tls_reload_interval: Duration,

    /// PEM bundle of extra CAs trusted for upstream HTTPS (in addition to the Mozilla roots).
    #[arg(long, env = "PORTCULLIS_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Master keyring file (32 bytes as raw, hex or base64). Local mode makes an ephemeral one
    /// when absent.
    #[arg(long, env = "PORTCULLIS_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// Pepper for client key digests (at least 32 bytes as raw, hex or base64). Local mode makes
    /// an ephemeral one when absent.
    #[arg(long, env = "PORTCULLIS_PEPPER_FILE")]
    pub pepper_file: Option<PathBuf>,

    /// trace, debug, info, warn or error; or a full filter such as `info,portcullis=debug`.
    #[arg(long, env = "PORTCULLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Largest request body accepted (413 above).
    #[arg(long, env = "PORTCULLIS_MAX_REQUEST_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_body_bytes: usize,

    /// Request bodies held in memory at once, across every connection and stream, in bytes. A
    /// body that does not fit is refused with a 503 and `Retry-After`. Default: half the
    /// container's memory limit (cgroup), else 1 GiB; never less than twice `--max-request-body-bytes`
    /// and 2 KiB (a body, and the copy the gateway writes when it renames the model or asks for
    /// usage, which may be up to 2 KiB longer).
    #[arg(long, env = "PORTCULLIS_MAX_BUFFERED_BODY_BYTES")]
    pub max_buffered_body_bytes: Option<usize>,

    /// Seconds a client has to send its request headers.
    #[arg(long, value_parser = seconds, default_value = "10")]
    pub header_read_timeout: Duration,

    /// Seconds a client has to send its request body.
    #[arg(long, value_parser = seconds, default_value = "30")]
    pub request_body_timeout: Duration,

    /// Seconds a client may take to accept any more of a response that does not fit in the socket
    /// buffers (nginx's `send_timeout`): an HTTP/1.1 client that stops reading is disconnected;
    /// an HTTP/2 stream that gets no more window loses its provider request (and is reset when
    /// the client next grants window).
    #[arg(long, value_parser = seconds, default_value = "60")]
    pub response_write_timeout: Duration,

    /// Seconds to resolve an upstream's name and connect to it, and again for the TLS handshake of
    /// an HTTPS one.
    #[arg(long, value_parser = seconds, default_value = "10")]
    pub upstream_connect_timeout: Duration,

    /// Seconds to wait for an upstream's response headers (long: reasoning models think first).
    #[arg(long, value_parser = seconds, default_value = "600")]
    pub upstream_response_timeout: Duration,

    /// Seconds an upstream response body may go without sending anything.
    #[arg(long, value_parser = seconds, default_value = "300")]
    pub upstream_idle_timeout: Duration,

    /// Most client connections served at once; beyond it new connections wait in the listen
    /// backlog while idle ones are closed to make room (nginx's `worker_connections`). Default:
    /// 16,384, or as many as the open-file limit holds at two descriptors per connection (its
    /// own and a provider's) beside a reserve. A value the limit cannot hold is lowered, with a
    /// warning.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,

    /// Connections the kernel completes and queues for the traffic listener before it accepts
    /// them (the listen backlog; the kernel caps it at `net.core.somaxconn`). A burst beyond it
    /// has its handshakes dropped, and clients retry them a second or more later.
    #[arg(long, env = "PORTCULLIS_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub listen_backlog: u32,

    /// Seconds the listener keeps accepting after SIGTERM, while `/readyz` already says
    /// draining: the time a load balancer or kube-proxy takes to stop sending new connections
    /// here (a rolling update's in-flight routing). A second SIGTERM ends it early. The drain
    /// follows.
    #[arg(long, env = "PORTCULLIS_SHUTDOWN_DELAY", value_parser = seconds, default_value = "0")]
    pub shutdown_delay: Duration,

    /// Seconds in-flight requests and streams get to finish after SIGTERM.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", value_parser = seconds, default_value = "30")]
    pub drain_timeout: Duration,

    /// Redis URL for limits shared by every replica (`redis://host:6379/0`). Without it, limits
    /// are kept in this process.
    #[arg(long, env = "PORTCULLIS_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Seconds a Redis call may take. An admission whose call is unanswered by then is refused
    /// as busy (503) while Redis answers other calls, some of them within this time in the last
    /// max(20 × it, 1 s); when Redis answers nothing, or nothing in time for that long, the
    /// failure policy applies.
    #[arg(long, value_parser = seconds, default_value = "0.05")]
    pub redis_timeout: Duration,

    /// When Redis is unreachable: `local` (each replica enforces limit ÷ --limiter-replicas),
    /// `open` (no limits), or `closed` (refuse with 503). ApiKeys may override it.
    #[arg(long, env = "PORTCULLIS_LIMITER_FAILURE_POLICY", value_parser = failure_policy, default_value = "local")]
    pub limiter_failure_policy: portcullis_crds::v1alpha1::FailurePolicy,

    /// Data-plane replicas sharing the limits: each enforces limit ÷ this without --redis-url,
    /// and under the `local` policy while Redis is unreachable.
    #[arg(long, env = "PORTCULLIS_LIMITER_REPLICAS", default_value_t = 1)]
    pub limiter_replicas: u64,

    /// Failed authentications from one address that trigger a lockout.
    #[arg(long, default_value_t = 10)]
    pub lockout_threshold: u64,

    /// Seconds over which failed authentications are counted.
    #[arg(long, value_parser = seconds, default_value = "60")]
    pub lockout_window: Duration,

    /// Seconds a locked-out address is refused.
    #[arg(long, value_parser = seconds, default_value = "300")]
    pub lockout_backoff: Duration,

    /// Proxy address ranges (CIDR, comma-separated) whose `X-Forwarded-For` is believed.
    #[arg(long, env = "PORTCULLIS_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Output tokens reserved against limits when a request sets no `max_tokens`.
    #[arg(long, default_value_t = 512)]
    pub default_output_tokens: u64,

    /// Threads serving traffic. 1 serves every request on one thread (no cross-thread wake-ups
    /// on a request's way, the fastest choice for a one-core container or sidecar); the Redis
    /// connection, with `--redis-url`, has a thread of its own (not with `--busy-poll-us`).
    /// Default: one per CPU.
    #[arg(long, env = "PORTCULLIS_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Busy polling, for a data plane on a dedicated core (needs `--worker-threads 1`): after
    /// each request, keep polling the sockets for this many microseconds instead of sleeping,
    /// so the next packet is seen without waiting for an idle core to wake (tens of µs on a
    /// VM). The core stays busy while traffic flows and idles again one window after it stops.
    /// 0 (the default) turns it off; at most 1,000,000.
    #[arg(long, env = "PORTCULLIS_BUSY_POLL_US", default_value_t = 0, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub busy_poll_us: u64,

    /// How often local mode looks for changed manifests, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub reload_interval_ms: u64,

    /// Cluster mode: watch this snapshot Secret (`NAMESPACE/NAME`) through the Kubernetes API
    /// (in-cluster config or KUBECONFIG).
    #[arg(long, env = "PORTCULLIS_SNAPSHOT_SECRET", value_name = "NAMESPACE/NAME", conflicts_with = "manifests")]
    pub snapshot_secret: Option<String>,

    /// Cluster mode: the master keyring Secret (`NAMESPACE/NAME`, or `NAME` in the snapshot's
    /// namespace).
    #[arg(long, env = "PORTCULLIS_KEYRING_SECRET", default_value = "portcullis-master-keyring")]
    pub keyring_secret: String,

    /// Cluster mode: the pepper Secret (`NAMESPACE/NAME`, or `NAME` in the snapshot's namespace).
    #[arg(long, env = "PORTCULLIS_PEPPER_SECRET", default_value = "portcullis-pepper")]
    pub pepper_secret: String,

    /// Cluster mode: report the applied snapshot generation in this replica's own Lease
    /// (`portcullis-dp-<replica>`, in the snapshot's namespace), from which the operator counts
    /// how many replicas enforce each change.
    #[arg(long, env = "PORTCULLIS_ACK_LEASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ack_lease: bool,

    /// This replica's name in its acknowledgement Lease; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,

    /// The pod's UID: the acknowledgement Lease is owned by the pod, so it goes with it.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,

    /// The pod's namespace (an owner must live in the same namespace as the Lease).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

impl DataplaneArgs {
    /// Which namespaces' credentials and kill switches reach every namespace, in local mode.
    pub fn tenancy(&self) -> Tenancy {
        if self.platform_namespace.is_empty() {
            Tenancy::Shared
        } else {
            Tenancy::platform(self.platform_namespace.iter().cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_a_number_from_zero_to_a_day() {
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert_eq!(seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(seconds("86400"), Ok(Duration::from_secs(86_400)));
        for refused in ["86400.5", "1e300", "-1", "NaN", "inf", "ten", ""] {
            assert!(seconds(refused).is_err(), "{refused:?}");
        }
    }
}
