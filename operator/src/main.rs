//! `portcullis-operator`: argument parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKeyring};

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
    /// Compile a folder of manifests offline and report every problem, naming object and field
    /// (for CI of a GitOps repository). Exits non-zero when the folder would be rejected.
    Check {
        #[arg(long)]
        manifests: PathBuf,
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
