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
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify the whole chain; names the first edited, deleted, reordered or truncated entry.
    Verify {
        /// The ledger file.
        #[arg(long)]
        file: PathBuf,
        /// A published checkpoint the ledger must reach: `SEQUENCE:HASH`.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Print the last entries, one JSON object per line.
    Tail {
        #[arg(long)]
        file: PathBuf,
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
        Command::Crds { output } => {
            let yaml = portcullis_operator::crdgen::render()?;
            match output {
                Some(path) => std::fs::write(path, yaml)?,
                None => print!("{yaml}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command: AuditCommand::Verify { file, checkpoint } } => {
            let checkpoint = match checkpoint {
                Some(text) => {
                    let (sequence, hash) =
                        text.split_once(':').ok_or_else(|| anyhow::anyhow!("--checkpoint is SEQUENCE:HASH"))?;
                    Some(ledger::Checkpoint { sequence: sequence.parse()?, hash: hash.to_owned() })
                }
                None => None,
            };
            let entries = ledger::read_lines(&file)?;
            match ledger::verify(&entries, checkpoint.as_ref()) {
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
        Command::Audit { command: AuditCommand::Tail { file, lines } } => {
            let entries = ledger::read_lines(&file)?;
            for entry in entries.iter().skip(entries.len().saturating_sub(lines)) {
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
