//! Wiring: key material, the snapshot source, listeners and signals.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKey, MasterKeyring};
use portcullis_crds::secret::SecretBytes;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::{DataplaneArgs, LogFormat};
use crate::metrics::Metrics;
use crate::pipeline::{Gateway, PipelineSettings};
use crate::reload::{self, SnapshotApplier};
use crate::server::{self, ServerSettings};
use crate::snapshot::SnapshotHandle;

/// Installs the log subscriber. Logs carry metadata only; see `pipeline::meter`.
pub fn init_logging(args: &DataplaneArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?} is not a valid filter", args.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

/// Reads key material given as raw bytes, hex, or base64.
fn read_key_file(path: &Path) -> anyhow::Result<SecretBytes> {
    let raw = SecretBytes::new(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    let text = raw.trimmed();
    let decoded = hex::decode(text.expose())
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(text.expose()).ok());
    Ok(match decoded {
        Some(bytes) if bytes.len() >= 32 => SecretBytes::new(bytes),
        _ => raw,
    })
}

fn key_material(args: &DataplaneArgs) -> anyhow::Result<(MasterKeyring, Pepper)> {
    let keyring = match &args.master_key_file {
        Some(path) => {
            let key = MasterKey::from_bytes(read_key_file(path)?.expose())?;
            let mut keys = std::collections::BTreeMap::new();
            keys.insert(KeyId::new("file")?, key);
            MasterKeyring::new(KeyId::new("file")?, keys)?
        }
        None => MasterKeyring::generate(KeyId::new("ephemeral")?)?,
    };
    let pepper = match &args.pepper_file {
        Some(path) => Pepper::new(read_key_file(path)?)?,
        None => Pepper::generate()?,
    };
    Ok((keyring, pepper))
}

/// The busy-poll window the flags ask for. Spinning only makes sense on the single-threaded
/// runtime: on the multi-threaded one it would keep a worker spinning that serves nothing.
fn busy_poll_window(args: &DataplaneArgs) -> anyhow::Result<Option<Duration>> {
    if args.busy_poll_us == 0 {
        return Ok(None);
    }
    if args.worker_threads != Some(1) {
        bail!("--busy-poll-us needs --worker-threads 1 (one pinned thread serving everything)");
    }
    Ok(Some(Duration::from_micros(args.busy_poll_us)))
}

/// The bytes of request bodies held at once: the flag, or half the container's memory.
fn body_budget_limit(args: &DataplaneArgs) -> anyhow::Result<usize> {
    let least = crate::pipeline::body_budget::least_limit(args.max_request_body_bytes);
    match args.max_buffered_body_bytes {
        Some(limit) if limit < least => bail!(
            "--max-buffered-body-bytes ({limit}) must hold at least {least} bytes: a largest body \
             (--max-request-body-bytes {}) and the copy a rewrite for the provider makes of it, up to {} bytes longer",
            args.max_request_body_bytes,
            crate::pipeline::rewrite::MAX_GROWTH
        ),
        Some(limit) => Ok(limit),
        None => Ok(crate::pipeline::body_budget::default_limit(args.max_request_body_bytes)),
    }
}

/// Runs the data plane until SIGTERM/SIGINT and the drain that follows.
pub async fn run(args: DataplaneArgs) -> anyhow::Result<()> {
    let busy_poll_window = busy_poll_window(&args)?;
    let cluster = crate::cluster::ClusterSource::from_args(&args).await?;
    let manifests = match (&cluster, args.manifests.clone()) {
        (Some(_), _) => None,
        (None, Some(dir)) if dir.is_dir() => Some(dir),
        (None, Some(dir)) => bail!("--manifests {} is not a folder", dir.display()),
        (None, None) => {
            bail!("either --manifests DIR (local mode) or --snapshot-secret NAMESPACE/NAME (cluster mode) is required")
        }
    };
    let (keyring, pepper) = match &cluster {
        Some(cluster) => cluster.key_material().await?,
        None => key_material(&args)?,
    };
    let metrics = Arc::new(Metrics::new()?);
    let body_budget = Arc::new(crate::pipeline::body_budget::BodyBudget::new(body_budget_limit(&args)?));
    metrics.body_budget_bytes.set(i64::try_from(body_budget.limit()).unwrap_or(i64::MAX));
    let busy_poll =
        busy_poll_window.map(|window| crate::busy_poll::BusyPoll::new(window, metrics.busy_poll_turns.clone()));
    let halt_poll_ns = std::fs::read_to_string(crate::busy_poll::HALT_POLL_NS).ok();
    if busy_poll.is_none() && crate::busy_poll::halts_without_polling(halt_poll_ns.as_deref()) {
        tracing::info!(
            guest_halt_poll_ns = 0,
            "this VM's idle CPUs halt without polling: at low concurrency each request waits for idle cores to wake \
             (about +150 µs at one connection in bench/run.sh); --worker-threads 1 --busy-poll-us 500 trades a busy core for it"
        );
    }
    let handle = Arc::new(SnapshotHandle::default());
    // Client connections and provider connections share the open-file limit, one of each per
    // client connection.
    let max_connections =
        server::connection_limit(args.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)));
    let client = crate::upstream::build_client(args.upstream_ca.as_deref(), args.upstream_connect_timeout)?
        .with_max_open(max_connections);
    let (tls, _certificate_reloads) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let (config, certificates) = crate::tls::server_config(cert, key)?;
            let reloads = tokio::spawn(certificates.watch(args.tls_reload_interval));
            (Some(tokio_rustls::TlsAcceptor::from(config)), Some(tokio_util::task::AbortOnDropHandle::new(reloads)))
        }
        _ => (None, None),
    };
    let limiter = crate::limits::Limiter::new(
        crate::limits::LimiterSettings {
            default_policy: args.limiter_failure_policy,
            replicas: args.limiter_replicas.max(1),
            redis_url: args.redis_url.clone(),
            redis_timeout: args.redis_timeout,
            lockout_threshold: args.lockout_threshold.max(1),
            lockout_window: args.lockout_window,
            lockout_backoff: args.lockout_backoff,
            trusted_proxies: args.trusted_proxies.clone(),
            default_output_tokens: args.default_output_tokens,
            // A busy-polling thread never sleeps while traffic flows: a thread of the store's
            // would wait for the core (see `StoreThread::Serving`).
            redis_thread: if busy_poll_window.is_some() {
                crate::limits::StoreThread::Serving
            } else {
                crate::limits::StoreThread::Own
            },
        },
        Arc::new(crate::limits::SystemClock::default()),
        crate::limits::LimiterMetrics::register(metrics.registry())?,
    )?;
    limiter.spawn_health_probe();
    let gateway = Arc::new(Gateway::new(
        handle.clone(),
        metrics.clone(),
        client,
        limiter.clone(),
        PipelineSettings {
            max_request_body_bytes: args.max_request_body_bytes,
            body_budget: body_budget.clone(),
            request_body_timeout: args.request_body_timeout,
            upstream_response_timeout: args.upstream_response_timeout,
            upstream_idle_timeout: args.upstream_idle_timeout,
        },
    ));

    let listener =
        crate::server::bind(args.listen, args.listen_backlog).with_context(|| format!("binding {}", args.listen))?;
    let admin_listener =
        TcpListener::bind(args.admin_listen).await.with_context(|| format!("binding {}", args.admin_listen))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Load the first snapshot before accepting traffic, so the first request is served.
    let mut applier = SnapshotApplier::new(handle.clone(), (*metrics).clone(), keyring, pepper);
    let mut ack_task = None;
    let (source, reload_task) = match (cluster, &manifests) {
        (Some(cluster), _) => {
            cluster.load_initial(&mut applier).await?;
            let source = format!("Secret {}", cluster.snapshot);
            let (applied_tx, applied_rx) =
                watch::channel(applier.last_applied().map(crate::acknowledge::AppliedSnapshot::of));
            if let Some(lease) = cluster.replica_lease(&args) {
                ack_task = Some(tokio::spawn(lease.run(applied_rx, shutdown_rx.clone())));
            }
            (source, tokio::spawn(cluster.run(applier, shutdown_rx.clone(), applied_tx)))
        }
        (None, Some(manifests)) => {
            // Taken before reading: a change made while the folder is read is seen as one.
            let loaded = reload::fingerprint(manifests);
            let tenancy = args.tenancy();
            match reload::compile_dir(manifests, &tenancy, &applier) {
                Ok(snapshot) => {
                    applier.apply(snapshot);
                }
                Err(reason) => applier.reject(&reason),
            }
            let task = tokio::spawn(reload::run_local(
                manifests.clone(),
                tenancy,
                Duration::from_millis(args.reload_interval_ms.max(10)),
                applier,
                shutdown_rx.clone(),
                Some(loaded),
            ));
            (manifests.display().to_string(), task)
        }
        (None, None) => bail!("no snapshot source"),
    };

    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        snapshot: handle.clone(),
        limiter: limiter.clone(),
        body_budget,
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), args.header_read_timeout));
    tracing::info!(
        listen = %args.listen,
        admin = %args.admin_listen,
        tls = tls.is_some(),
        redis = args.redis_url.is_some(),
        source = %source,
        max_connections,
        body_budget_bytes = admin_state.body_budget.limit(),
        "portcullis data plane started"
    );

    let spinner = busy_poll.clone().map(|busy| tokio::spawn(busy.run(shutdown_rx.clone())));
    let server_task = tokio::spawn(server::serve(
        listener,
        tls,
        gateway,
        metrics,
        ServerSettings {
            header_read_timeout: args.header_read_timeout,
            response_write_timeout: args.response_write_timeout,
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: args.drain_timeout,
            max_connections,
            busy_poll,
        },
        shutdown_rx,
    ));

    portcullis_operator::cluster::shutdown_signal().await;
    tracing::info!("shutdown requested");
    admin_state.draining.store(true, Ordering::Relaxed);
    if !args.shutdown_delay.is_zero() {
        // Still serving new connections while the endpoints that route here are withdrawn.
        tracing::info!(delay_secs = args.shutdown_delay.as_secs_f64(), "accepting until the shutdown delay passes");
        tokio::select! {
            () = tokio::time::sleep(args.shutdown_delay) => {}
            () = portcullis_operator::cluster::shutdown_signal() => tracing::info!("second signal: draining now"),
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = server_task.await;
    if let Some(task) = spinner {
        let _ = task.await;
    }
    let _ = reload_task.await;
    if let Some(task) = ack_task {
        let _ = task.await;
    }
    // Unspent slices and owed settlements go back to the shared store before the process ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), limiter.flush()).await;
    admin_task.abort();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// The body budget the flags give, with bodies of at most 4096 bytes.
    fn budget(flag: Option<usize>) -> anyhow::Result<usize> {
        let flag = flag.map(|bytes| bytes.to_string());
        let mut argv = vec!["portcullis-dataplane", "--manifests", "x", "--max-request-body-bytes", "4096"];
        argv.extend(flag.iter().flat_map(|bytes| ["--max-buffered-body-bytes", bytes]));
        body_budget_limit(&DataplaneArgs::try_parse_from(argv)?)
    }

    /// The budget must hold a largest body and the copy a rewrite makes of it; unset, it is
    /// never less than that either.
    #[test]
    fn the_body_budget_holds_a_largest_body_and_its_rewritten_copy() {
        let least = 2 * 4096 + crate::pipeline::rewrite::MAX_GROWTH;
        assert_eq!(budget(Some(least)).unwrap(), least);
        let refused = budget(Some(least - 1)).unwrap_err().to_string();
        assert!(refused.contains(&least.to_string()), "{refused}");
        assert!(budget(None).unwrap() >= least);
    }
}
