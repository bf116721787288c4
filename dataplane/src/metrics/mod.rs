//! Prometheus metrics. OpenTelemetry GenAI names where one exists, `portcullis_*` otherwise.
//!
//! Cardinality is bounded by configuration, never by clients: routes and outcomes are fixed sets,
//! providers are ProviderCredential names, and models are the names (or glob patterns) declared
//! in ProviderCredentials, not whatever string a client sent. There is no per-key label.

mod histogram;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::api::ApiRoute;
pub use histogram::{Histogram, HistogramFamily};

/// The series one route of one model writes on success, looked up once and then cached on the
/// route (a label lookup hashes every label and takes a lock).
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    pub duration_ok: Histogram,
    pub time_to_first_token: Histogram,
    pub input_tokens: Histogram,
    pub output_tokens: Histogram,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub token_usage: HistogramFamily,
    pub request_duration: HistogramFamily,
    pub time_to_first_token: HistogramFamily,
    pub snapshot_generation: IntGauge,
    pub snapshot_valid: IntGauge,
    pub snapshot_reloads: IntCounter,
    pub snapshot_reload_failures: IntCounter,
    pub open_connections: IntGauge,
    /// The most client connections open at once (`--max-connections`, or less if the file
    /// descriptor limit cannot hold it).
    pub max_connections: IntGauge,
    /// Times the listener stopped accepting because `max_connections` were open.
    pub connection_limit_waits: IntCounter,
    /// Idle connections closed at the connection limit to make room for waiting ones.
    pub idle_connections_reclaimed: IntCounter,
    /// `--max-buffered-body-bytes`, as applied.
    pub body_budget_bytes: IntGauge,
    /// Request body bytes held when last scraped.
    pub body_bytes_held: IntGauge,
    pub busy_poll_turns: IntCounter,
    /// `portcullis_requests_total{route, outcome="ok"}` by `ApiRoute::index`.
    requests_ok: Vec<IntCounter>,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "portcullis_requests_total",
                    "Requests handled, by route and outcome (ok, upstream_error, or a gateway error code)",
                ),
                &["route", "outcome"],
            )?,
        )?;
        // The GenAI semantic conventions' families, with their labels.
        const OPERATION: [&str; 3] = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"];
        let family = |name: &str, help: &str, last_label: Option<&str>, bounds: &[f64]| {
            let labels: Vec<&str> = OPERATION.iter().copied().chain(last_label).collect();
            register(&registry, HistogramFamily::new(name, help, &labels, bounds)?)
        };
        let token_usage = family(
            "gen_ai_client_token_usage",
            "Tokens used per request, by token type (input or output)",
            Some("gen_ai_token_type"),
            &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0],
        )?;
        let request_duration = family(
            "gen_ai_server_request_duration",
            "Seconds from request start to the last response byte",
            Some("error_type"),
            &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
        )?;
        let time_to_first_token = family(
            "gen_ai_server_time_to_first_token",
            "Seconds from request start to the first response body byte",
            None,
            &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0],
        )?;
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help)?);
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help)?);
        let requests_ok = ApiRoute::ALL.iter().map(|r| requests.with_label_values(&[r.label(), "ok"])).collect();
        Ok(Self {
            snapshot_generation: gauge("portcullis_snapshot_generation", "Generation of the snapshot being served")?,
            snapshot_valid: gauge(
                "portcullis_snapshot_valid",
                "1 when the latest configuration was applied, 0 when it was rejected and an older snapshot keeps serving",
            )?,
            snapshot_reloads: counter("portcullis_snapshot_reloads_total", "Snapshots applied")?,
            snapshot_reload_failures: counter(
                "portcullis_snapshot_reload_failures_total",
                "Configurations rejected whole (the last good snapshot kept serving)",
            )?,
            open_connections: gauge("portcullis_open_connections", "Client connections currently open")?,
            max_connections: gauge(
                "portcullis_max_connections",
                "Most client connections served at once; beyond it new ones wait in the listen backlog",
            )?,
            connection_limit_waits: counter(
                "portcullis_connection_limit_waits_total",
                "Times the listener stopped accepting because the most client connections were open",
            )?,
            idle_connections_reclaimed: counter(
                "portcullis_idle_connections_reclaimed_total",
                "Idle client connections closed at the connection limit to make room for waiting ones",
            )?,
            body_budget_bytes: gauge(
                "portcullis_request_body_budget_bytes",
                "Most request body bytes held at once across connections and streams; beyond it requests get 503",
            )?,
            body_bytes_held: gauge(
                "portcullis_request_body_bytes_held",
                "Request body bytes held now (being read, or waiting to be written to the provider)",
            )?,
            busy_poll_turns: counter(
                "portcullis_busy_poll_turns_total",
                "Turns the busy-poll spinner took polling sockets instead of sleeping (0 with --busy-poll-us off)",
            )?,
            requests_ok,
            requests,
            token_usage,
            request_duration,
            time_to_first_token,
            registry,
        })
    }

    /// Counts one successful request on `route`.
    pub fn count_ok(&self, route: ApiRoute) {
        if let Some(counter) = self.requests_ok.get(route.index()) {
            counter.inc();
        }
    }

    pub fn route_metrics(&self, op: &str, provider: &str, model: &str) -> RouteMetrics {
        RouteMetrics {
            duration_ok: self.request_duration.with_label_values(&[op, provider, model, ""]),
            time_to_first_token: self.time_to_first_token.with_label_values(&[op, provider, model]),
            input_tokens: self.token_usage.with_label_values(&[op, provider, model, "input"]),
            output_tokens: self.token_usage.with_label_values(&[op, provider, model, "output"]),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on inconsistent metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Registers `metric` with `registry` and hands it back, for the caller to keep.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}
