//! `portcullis-operator`: argument parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKeyring};
use portcullis_operator::ledger;

#[derive(Parser, Debug)]
#[command(name = "portcullis-operator", version, about = "Portcullis operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds {
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// The audit ledger.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Compile a folder of manifests offline and report every problem, naming object and field
    /// (for CI of a GitOps repository). Exits non-zero when the folder would be rejected.
    Check {
        #[arg(long)]
        manifests: PathBuf,
    },
    /// Run in a cluster: reconcile ApiKeys, ProviderCredentials and KillSwitches into the
    /// snapshot Secret (in-cluster config or KUBECONFIG).
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace of the snapshot, keyring and pepper Secrets and the leader Lease.
    #[arg(long, env = "PORTCULLIS_NAMESPACE", default_value = "portcullis-system")]
    namespace: String,
    /// Another namespace whose ProviderCredentials and KillSwitches reach the ApiKeys of every
    /// namespace, like those in `--namespace` (repeat, or separate with commas; `*` trusts every
    /// namespace). Those in any other namespace apply only to their own namespace's keys.
    #[arg(long, env = "PORTCULLIS_PLATFORM_NAMESPACES", value_name = "NAMESPACE", value_delimiter = ',')]
    platform_namespace: Vec<String>,
    #[arg(long, env = "PORTCULLIS_SNAPSHOT_SECRET", default_value = "portcullis-snapshot")]
    snapshot_secret: String,
    #[arg(long, env = "PORTCULLIS_KEYRING_SECRET", default_value = "portcullis-master-keyring")]
    keyring_secret: String,
    #[arg(long, env = "PORTCULLIS_PEPPER_SECRET", default_value = "portcullis-pepper")]
    pepper_secret: String,
    /// Seconds a reveal Secret lives unless annotated `portcullis.dev/consumed: "true"` first.
    #[arg(long, env = "PORTCULLIS_REVEAL_TTL_SECONDS", default_value_t = 86_400)]
    reveal_ttl_seconds: u32,
    /// Leader election Lease name; empty to run without leader election (one replica only).
    #[arg(long, env = "PORTCULLIS_LEASE", default_value = "portcullis-operator")]
    lease: String,
    /// This replica's identity in the Lease (defaults to the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address for /metrics and /healthz.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    admin_listen: std::net::SocketAddr,
    /// The audit ledger: an append-only JSON-lines file, fsynced per entry. Put it on a
    /// PersistentVolume (ReadWriteOnce is enough: only the leader opens it). Unset: no ledger.
    #[arg(long, env = "PORTCULLIS_LEDGER_FILE", conflicts_with = "ledger_redis_url")]
    ledger_file: Option<PathBuf>,
    /// The audit ledger in a Redis Stream instead (`redis://`; may hold a
    /// password, so prefer the environment variable from a Secret).
    #[arg(long, env = "PORTCULLIS_LEDGER_REDIS_URL", hide_env_values = true)]
    ledger_redis_url: Option<String>,
    /// The Redis Stream key holding the ledger.
    #[arg(long, env = "PORTCULLIS_LEDGER_REDIS_KEY", default_value = ledger::redis_store::DEFAULT_STREAM_KEY)]
    ledger_redis_key: String,
    /// Serve the validating admission webhook (HTTPS) with this PEM certificate chain. Reloaded
    /// when the file changes.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CERT", requires = "webhook_key")]
    webhook_cert: Option<PathBuf>,
    /// PEM private key for --webhook-cert.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_KEY", requires = "webhook_cert")]
    webhook_key: Option<PathBuf>,
    /// Address of the admission webhook (POST /validate).
    #[arg(long, env = "PORTCULLIS_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    webhook_listen: std::net::SocketAddr,
    /// Require callers of the webhook to present a client certificate from this PEM CA bundle
    /// (the API server does, given an AdmissionConfiguration kubeconfig). Reloaded when the file
    /// changes. Unset: anyone who reaches the port can post a review, and so name the actor of
    /// the next ledger entry.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CLIENT_CA", requires = "webhook_cert")]
    webhook_client_ca: Option<PathBuf>,
    /// With --webhook-client-ca: the caller's certificate must name one of these as its subject
    /// CN or a DNS SAN (repeat the flag, or separate with commas). Unset: any certificate from
    /// the CA.
    #[arg(long, env = "PORTCULLIS_WEBHOOK_CLIENT_NAMES", value_delimiter = ',', requires = "webhook_client_ca")]
    webhook_client_name: Vec<String>,
    /// Seconds between republishing the ledger head (ConfigMap annotation and Event).
    #[arg(long, default_value_t = 300)]
    checkpoint_seconds: u64,
    /// Seconds between full resyncs of every object.
    #[arg(long, default_value_t = 300)]
    resync_seconds: u64,
    /// trace, debug, info, warn or error; or a full filter.
    #[arg(long, env = "PORTCULLIS_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "PORTCULLIS_LOG_JSON")]
    log_json: bool,
}

fn run_cluster(args: RunArgs) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = if args.log_json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    installed.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("portcullis-operator-{}", std::process::id()));
    let tenancy =
        portcullis_operator::Tenancy::platform(args.platform_namespace.iter().cloned().chain([args.namespace.clone()]));
    let settings = portcullis_operator::cluster::RunSettings {
        settings: portcullis_operator::cluster::context::Settings {
            tenancy: tenancy.clone(),
            namespace: args.namespace,
            snapshot_secret: args.snapshot_secret,
            keyring_secret: args.keyring_secret,
            pepper_secret: args.pepper_secret,
            reveal_ttl: chrono::Duration::seconds(i64::from(args.reveal_ttl_seconds)),
            resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        },
        lease: (!args.lease.is_empty()).then_some(args.lease),
        identity,
        admin_listen: args.admin_listen,
        ledger_file: args.ledger_file,
        ledger_redis: args.ledger_redis_url.map(|url| ledger::RedisLedgerSettings::new(url, args.ledger_redis_key)),
        webhook: match (args.webhook_cert, args.webhook_key) {
            (Some(cert), Some(key)) => {
                let mut webhook =
                    portcullis_operator::webhook::WebhookSettings::new(args.webhook_listen, cert, key, tenancy);
                webhook.client_auth =
                    args.webhook_client_ca.map(|ca| portcullis_operator::webhook::ClientAuthSettings {
                        ca,
                        names: args.webhook_client_name.into_iter().filter(|name| !name.is_empty()).collect(),
                    });
                Some(webhook)
            }
            _ => None,
        },
        checkpoint_every: std::time::Duration::from_secs(args.checkpoint_seconds.max(1)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = portcullis_apiclient::client().await?;
        portcullis_operator::cluster::run(client, settings).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Where `audit verify` and `audit tail` read the ledger: a file or a Redis Stream.
#[derive(clap::Args, Debug)]
struct LedgerSource {
    /// The ledger file (takes precedence over --redis-url).
    #[arg(long, required_unless_present = "redis_url")]
    file: Option<PathBuf>,
    /// The ledger's Redis (`redis://…`); positions in messages count stream entries from 1.
    /// Prefer the environment variable: a URL with a password on the command line is visible
    /// to other users of the machine.
    #[arg(long, env = "PORTCULLIS_LEDGER_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The ledger's stream key (with --redis-url).
    #[arg(long, default_value = ledger::redis_store::DEFAULT_STREAM_KEY)]
    stream_key: String,
}

impl LedgerSource {
    /// Verifies the whole ledger (for Redis also that no entry was deleted from the stream).
    fn verify(
        &self,
        checkpoint: Option<&ledger::Checkpoint>,
    ) -> anyhow::Result<Result<ledger::VerifyReport, ledger::VerifyError>> {
        if let Some(file) = &self.file {
            return Ok(ledger::verify(&ledger::read_lines(file)?, checkpoint));
        }
        let settings = ledger::RedisLedgerSettings::new(self.redis_url.clone().unwrap_or_default(), &self.stream_key);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut connection = ledger::redis_store::connect(&settings).await?;
            Ok(ledger::redis_store::verify_stream(&mut connection, &settings.stream_key, checkpoint).await?.1)
        })
    }

    /// The newest `count` entries, oldest first.
    fn tail(&self, count: usize) -> anyhow::Result<Vec<Result<ledger::LedgerEntry, usize>>> {
        if let Some(file) = &self.file {
            let entries = ledger::read_lines(file)?;
            let skip = entries.len().saturating_sub(count);
            return Ok(entries.into_iter().skip(skip).collect());
        }
        let settings = ledger::RedisLedgerSettings::new(self.redis_url.clone().unwrap_or_default(), &self.stream_key);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut connection = ledger::redis_store::connect(&settings).await?;
            Ok(ledger::redis_store::tail_stream(&mut connection, &settings.stream_key, count).await?)
        })
    }
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify the whole chain; names the first edited, deleted, reordered or truncated entry.
    Verify {
        #[command(flatten)]
        source: LedgerSource,
        /// A published checkpoint the ledger must reach: `SEQUENCE:HASH`.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Print the last entries, one JSON object per line.
    Tail {
        #[command(flatten)]
        source: LedgerSource,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_cluster(*args),
        Command::Crds { output } => {
            let yaml = portcullis_operator::crdgen::render()?;
            match output {
                Some(path) => std::fs::write(path, yaml)?,
                None => print!("{yaml}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command: AuditCommand::Verify { source, checkpoint } } => {
            let checkpoint = match checkpoint {
                Some(text) => {
                    let (sequence, hash) =
                        text.split_once(':').ok_or_else(|| anyhow::anyhow!("--checkpoint is SEQUENCE:HASH"))?;
                    Some(ledger::Checkpoint { sequence: sequence.parse()?, hash: hash.to_owned() })
                }
                None => None,
            };
            match source.verify(checkpoint.as_ref())? {
                Ok(report) => {
                    match report.head {
                        Some(head) => println!("ok: {} entries, head {}:{}", report.entries, head.sequence, head.hash),
                        None => println!("ok: empty ledger"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    println!("broken: {broken}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Audit { command: AuditCommand::Tail { source, lines } } => {
            for entry in &source.tail(lines)? {
                match entry {
                    Ok(entry) => println!("{}", serde_json::to_string(entry)?),
                    Err(line) => println!("{{\"unreadableLine\":{line}}}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { manifests } => {
            let (inputs, summary) = portcullis_operator::manifests::read_dir(&manifests)?;
            // Throwaway key material: checking needs to seal, never to keep anything.
            let keyring = MasterKeyring::generate(KeyId::new("check")?)?;
            let pepper = Pepper::generate()?;
            match portcullis_operator::compile(&inputs, &keyring, &pepper, None) {
                Ok(compiled) => {
                    for warning in &compiled.warnings {
                        println!("warning: {warning}");
                    }
                    let c = &compiled.snapshot.content;
                    println!(
                        "ok: {} files, {} objects ({} skipped): {} ApiKeys, {} ProviderCredentials, {} KillSwitches",
                        summary.files,
                        summary.objects,
                        summary.skipped,
                        c.api_keys.len(),
                        c.credentials.len(),
                        c.kill_switches.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for error in &errors.0 {
                        println!("error: {error}");
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
