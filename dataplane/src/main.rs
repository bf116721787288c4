//! `portcullis-dataplane`: parse flags, start logging, run.

use std::process::ExitCode;

use clap::Parser;
use portcullis_dataplane::{app, config::DataplaneArgs};

fn main() -> ExitCode {
    let args = DataplaneArgs::parse();
    if let Err(e) = app::init_logging(&args) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let built = match args.worker_threads {
        // One thread serves everything; the blocking pool's threads (a manifest compile, a DNS
        // lookup) leave a second after their work instead of ten, so the process is
        // single-threaded again soon, and the kernel skips the per-syscall file reference count.
        // (Not with `--redis-url` unless busy polling: the Redis connection keeps a thread of
        // its own.)
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_keep_alive(std::time::Duration::from_secs(1))
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n.max(1)).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let runtime = match built {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(app::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "data plane failed");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
