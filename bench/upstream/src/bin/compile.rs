//! Snapshot-scale tool.
//!
//! `bench-compile gen DIR KEYS PROVIDERS UPSTREAM_BASE_URL` writes manifests: KEYS ApiKeys (each
//! with its own Secret, bring-your-own key), PROVIDERS openai-compatible ProviderCredentials
//! (model `bench-model` on the first, `bench-model-N` on the others), and prints the client key of
//! the first ApiKey on stdout. Keys are deterministic and worthless: bench data only.
//!
//! `bench-compile reload DIR N` writes `25-reload.yaml` with one more ApiKey, so the folder's
//! content (and so the snapshot generation) changes.
//!
//! `bench-compile time DIR [ROUNDS]` times, in process, each phase of what the data plane does
//! on (re)load — read + parse the YAML, compile (validate, HMAC every key, seal provider keys),
//! open (unseal, index) — and prints the median and best of ROUNDS in milliseconds.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use peak_alloc::PeakAlloc;
use portcullis_crds::digest::Pepper;
use portcullis_crds::sealing::{KeyId, MasterKeyring};
use portcullis_dataplane::snapshot::RuntimeSnapshot;

/// Counts live heap bytes and their high-water mark, to tell what a snapshot keeps from what
/// loading it only passes through. The shim forwards every call to the system allocator except
/// `realloc`, which it does as allocate, copy, free: a buffer that grows counts its old and new
/// size together while it is copied, so the peak is an upper bound (about 2 MiB above the one an
/// in-place `realloc` would give at 10k keys).
#[global_allocator]
static HEAP: PeakAlloc = PeakAlloc;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn client_key(i: usize) -> String {
    // ≥ 32 printable characters, as the gateway requires.
    format!("pcl_bench_{i:08}_0123456789abcdefghijklmnopqrstuvwxyz")
}

fn apikey_doc(out: &mut String, name: &str, key: &str) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-key\n  namespace: default\ntype: Opaque\nstringData:\n  key: {key}\n"
    );
    // Limits far above anything the bench can reach: metered and checked, never throttling.
    let _ = write!(
        out,
        "---\napiVersion: portcullis.dev/v1alpha1\nkind: ApiKey\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  owner: bench@example.com\n  team: bench\n  allowedModels: [\"*\"]\n  limits:\n    requestsPerMinute: 1000000000\n    tokensPerMinute: 1000000000000\n  secretRef:\n    name: {name}-key\n    key: key\n"
    );
}

fn gen(dir: &Path, keys: usize, providers: usize, base_url: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut creds = String::new();
    let _ = write!(
        creds,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: upstream-key\n  namespace: default\ntype: Opaque\nstringData:\n  key: sk-bench-upstream\n"
    );
    for p in 0..providers.max(1) {
        let model = if p == 0 { "bench-model".to_owned() } else { format!("bench-model-{p}") };
        let _ = write!(
            creds,
            "---\napiVersion: portcullis.dev/v1alpha1\nkind: ProviderCredential\nmetadata:\n  name: bench-upstream-{p}\n  namespace: default\nspec:\n  kind: openai-compatible\n  baseUrl: {base_url}\n  secretRef:\n    name: upstream-key\n    key: key\n  models:\n    - name: {model}\n"
        );
    }
    std::fs::write(dir.join("10-providers.yaml"), creds)?;
    // Several files of up to 2,000 keys each (the reader caps a file at 16 MiB).
    let mut i = 0;
    let mut file = 0;
    while i < keys.max(1) {
        let mut out = String::new();
        let end = (i + 2000).min(keys.max(1));
        for k in i..end {
            apikey_doc(&mut out, &format!("bench-key-{k}"), &client_key(k));
        }
        std::fs::write(dir.join(format!("20-keys-{file:03}.yaml")), out)?;
        i = end;
        file += 1;
    }
    println!("{}", client_key(0));
    Ok(())
}

fn reload(dir: &Path, n: usize) -> anyhow::Result<()> {
    let mut out = String::new();
    apikey_doc(&mut out, &format!("bench-reload-{n}"), &client_key(10_000_000 + n));
    // Write then rename, so the watcher never sees half a file.
    let tmp = dir.join(".25-reload.yaml.tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, dir.join("25-reload.yaml"))?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0])
}

fn time(dir: &Path, rounds: usize) -> anyhow::Result<()> {
    let keyring = MasterKeyring::generate(KeyId::new("bench")?)?;
    let pepper = Pepper::generate()?;
    let (mut read, mut compile, mut open, mut total) = (vec![], vec![], vec![], vec![]);
    let (mut decode, mut cluster) = (vec![], vec![]);
    let mut summary = String::new();
    let mut memory = String::new();
    for round in 0..rounds.max(1) {
        let base = HEAP.current_usage();
        HEAP.reset_peak_usage();
        let t0 = Instant::now();
        let (inputs, _) = portcullis_operator::manifests::read_dir(dir).context("reading manifests")?;
        let t1 = Instant::now();
        let inputs_live = HEAP.current_usage() - base;
        let compiled = portcullis_operator::compile(&inputs, &keyring, &pepper, None)
            .map_err(|e| anyhow::anyhow!("compile failed: {e}"))?;
        let t2 = Instant::now();
        drop(inputs);
        let snapshot_live = HEAP.current_usage() - base;
        let before_open = HEAP.current_usage();
        // Opening takes the snapshot's keys: a copy is opened, made outside the timed part.
        let mut opening = compiled.snapshot.clone();
        let t2b = Instant::now();
        let runtime = RuntimeSnapshot::open(&mut opening, &keyring, &pepper)?;
        let t3 = Instant::now();
        drop(opening);
        let runtime_live = HEAP.current_usage() - before_open;
        let peak = HEAP.peak_usage() - base;
        // The cluster path: the snapshot arrives gzipped in a Secret, is inflated and verified,
        // then opened.
        let json = compiled.snapshot.to_json();
        let gzipped = compiled.snapshot.to_secret_data();
        let t4 = Instant::now();
        let mut decoded = portcullis_crds::snapshot::GatewaySnapshot::from_secret_data(|key| {
            (key == portcullis_crds::snapshot::SNAPSHOT_SECRET_GZIP_KEY).then_some(gzipped.as_slice())
        })?;
        let t5 = Instant::now();
        let reopened = RuntimeSnapshot::open(&mut decoded, &keyring, &pepper)?;
        let t6 = Instant::now();
        summary = format!("api_keys={} providers={}", runtime.api_key_count, runtime.upstream_count);
        if round == 0 {
            memory = format!(
                "heap: inputs after YAML parse {:.1} MiB; compiled GatewaySnapshot {:.1} MiB; \
                 RuntimeSnapshot (what serving keeps) {:.1} MiB; peak while loading {:.1} MiB; \
                 snapshot JSON {:.1} MiB, {:.2} MiB gzipped as its Secret holds it (a Secret holds 1 MiB)",
                mib(inputs_live),
                mib(snapshot_live),
                mib(runtime_live),
                mib(peak),
                mib(json.len()),
                mib(gzipped.len())
            );
        }
        read.push(ms(t1 - t0));
        compile.push(ms(t2 - t1));
        open.push(ms(t3 - t2b));
        total.push(ms((t2 - t0) + (t3 - t2b)));
        decode.push(ms(t5 - t4));
        cluster.push(ms(t6 - t4));
        drop((runtime, reopened, decoded, compiled));
    }
    println!("{summary}");
    println!("{memory}");
    println!("phase\tmedian_ms\tbest_ms");
    for (name, v) in [
        ("local: read+parse YAML", read),
        ("local: compile (validate, HMAC keys, seal)", compile),
        ("local: open+index (unseal, hash maps)", open),
        ("local: total", total),
        ("cluster: snapshot from its Secret (gunzip+parse+verify digest)", decode),
        ("cluster: total (from the Secret + open)", cluster),
    ] {
        let (m, b) = stats(v);
        println!("{name}\t{m:.1}\t{b:.1}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i).map(String::as_str).context("usage: bench-compile gen|reload|time ...")
    };
    match arg(1)? {
        "gen" => gen(Path::new(arg(2)?), arg(3)?.parse()?, arg(4)?.parse()?, arg(5)?),
        "reload" => reload(Path::new(arg(2)?), arg(3)?.parse()?),
        "time" => time(Path::new(arg(2)?), args.get(3).map_or(Ok(5), |s| s.parse())?),
        other => anyhow::bail!("unknown command {other}"),
    }
}
