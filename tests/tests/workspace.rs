//! The workspace's own rules, read from its manifests: every crate, the bench tools included,
//! takes the workspace lints, and those forbid `unsafe` code (a crate-level `allow` cannot lift a
//! `forbid`, so the compiler holds the line once a crate takes them).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `key = value` lines of one `[table]` of a Cargo manifest (comments and blank lines left out).
fn table(manifest: &str, name: &str) -> Option<Vec<String>> {
    let header = format!("[{name}]");
    let mut lines = manifest.lines().map(str::trim).skip_while(|l| *l != header);
    lines.next()?;
    Some(
        lines
            .take_while(|l| !l.starts_with('['))
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
    )
}

fn members(manifest: &str) -> Vec<String> {
    let start = manifest.find("members = [").map(|i| i + "members = [".len()).unwrap_or(manifest.len());
    let list = &manifest[start..];
    let list = &list[..list.find(']').unwrap_or(0)];
    list.split(',').map(|m| m.trim().trim_matches('"').to_owned()).filter(|m| !m.is_empty()).collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn every_crate_takes_the_workspace_lints_and_they_forbid_unsafe_code() {
    let workspace = read(&root().join("Cargo.toml"));
    let lints = table(&workspace, "workspace.lints.rust").expect("[workspace.lints.rust]");
    assert!(lints.iter().any(|l| l == r#"unsafe_code = "forbid""#), "workspace lints: {lints:?}");

    let members = members(&workspace);
    for expected in ["crds", "operator", "dataplane", "tests", "bench/upstream"] {
        assert!(members.iter().any(|m| m == expected), "{expected} is not a member: {members:?}");
    }
    for member in &members {
        let manifest = read(&root().join(member).join("Cargo.toml"));
        assert_eq!(
            table(&manifest, "lints"),
            Some(vec!["workspace = true".to_owned()]),
            "{member}/Cargo.toml must take the workspace lints as they are"
        );
        for own in ["lints.rust", "lints.clippy"] {
            assert!(table(&manifest, own).is_none(), "{member}/Cargo.toml sets its own [{own}]");
        }
    }
}

#[test]
fn the_manifest_reader_sees_a_crate_that_sets_its_own_lints() {
    let own = "[package]\nname = \"x\"\n\n[lints.rust]\nunsafe_code = \"deny\"\n\n[[bin]]\nname = \"y\"\n";
    assert_eq!(table(own, "lints"), None);
    assert_eq!(table(own, "lints.rust"), Some(vec![r#"unsafe_code = "deny""#.to_owned()]));
    let shared = "[lints]\n# comment\nworkspace   =   true\n\n[dependencies]\nx = \"1\"\n";
    assert_eq!(table(shared, "lints"), Some(vec!["workspace = true".to_owned()]));
    assert_eq!(members("members = [\"a\", \"b/c\"]\n"), vec!["a", "b/c"]);
}

/// The instructions of one stage of a Dockerfile (`FROM ... AS name` up to the next `FROM`).
fn stage<'a>(dockerfile: &'a str, name: &str) -> Option<Vec<&'a str>> {
    let mut lines = dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    lines.find(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {name}")))?;
    Some(lines.take_while(|l| !l.starts_with("FROM ")).collect())
}

#[test]
fn the_images_the_chart_runs_are_built_by_the_dockerfile_as_it_expects() {
    let dockerfile = read(&root().join("Dockerfile"));
    let values = read(&root().join("charts/portcullis/values.yaml"));
    let workspace = read(&root().join("Cargo.toml"));
    let version = table(&workspace, "workspace.package")
        .and_then(|t| t.iter().find_map(|l| l.strip_prefix("version = ").map(|v| v.trim_matches('"').to_owned())))
        .expect("workspace version");
    for (target, package) in [("operator", "portcullis-operator"), ("dataplane", "portcullis-dataplane")] {
        let lines = stage(&dockerfile, target).unwrap_or_else(|| panic!("no `{target}` stage"));
        let binary = format!("/usr/local/bin/{package}");
        assert!(lines.contains(&format!("ENTRYPOINT [\"{binary}\"]").as_str()), "{target}: {lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("COPY --from=build ") && l.ends_with(&binary)), "{target}");
        // The chart sets `runAsNonRoot`, which the kubelet can only check for a numeric user.
        let user = lines.iter().find_map(|l| l.strip_prefix("USER ")).unwrap_or_else(|| panic!("{target}: no USER"));
        assert!(
            user.split(':').all(|id| id.parse::<u32>().is_ok_and(|id| id != 0)),
            "{target}: USER {user} is not a numeric non-root user"
        );
        // The chart's default image is this stage's package at the workspace's version.
        let image = format!("{target}: ghcr.io/portcullis-dev/{package}:{version}");
        assert!(values.lines().any(|l| l.trim() == image), "values.yaml lacks `{image}`");
    }
    let build = stage(&dockerfile, "build").expect("a `build` stage");
    assert!(build.iter().any(|l| l.contains("cargo build --release --locked")), "{build:?}");
    let ignored = read(&root().join(".dockerignore"));
    for path in ["target", ".venv", ".git"] {
        assert!(ignored.lines().any(|l| l.trim() == path), ".dockerignore must leave out {path}");
    }
    // The data plane ships as the benchmark measures it: built with the committed profile.
    assert!(build.contains(&"RUN scripts/release-dataplane.sh /out/portcullis-dataplane"), "{build:?}");
    assert!(!ignored.lines().any(|l| l.trim().trim_matches('/') == "pgo"), ".dockerignore must keep pgo/");
}

/// The profile the shipped build uses is there, an indexed LLVM profile (what `-Cprofile-use`
/// reads; a raw `.profraw` committed by mistake would fail the image's build), trained with the
/// rustc the image builds with and with the data plane's present dependencies: its functions are
/// named by symbols whose hashes both decide, so with either changed it would match almost
/// nothing, silently (`scripts/release-dataplane.sh` refuses such a build; this says so before an
/// image is built).
#[test]
fn the_shipped_builds_profile_is_committed_indexed_and_current() {
    let profile =
        std::fs::read(root().join("pgo/portcullis-dataplane.profdata")).expect("pgo/portcullis-dataplane.profdata");
    const INDEXED_MAGIC: [u8; 8] = [0xff, b'l', b'p', b'r', b'o', b'f', b'i', 0x81];
    assert!(profile.starts_with(&INDEXED_MAGIC), "not an indexed profile (llvm-profdata merge writes one)");
    let checked = std::process::Command::new("bash")
        .arg(root().join("scripts/release-dataplane.sh"))
        .arg("--check")
        .output()
        .expect("run the script");
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let trained_at = read(&root().join("pgo/trained-at"));
    let rustc = trained_at.lines().find_map(|l| l.strip_prefix("rustc: ")).expect("pgo/trained-at names its rustc");
    let version = rustc.split_whitespace().nth(1).expect("rustc X.Y.Z (…)");
    let dockerfile = read(&root().join("Dockerfile"));
    let from = dockerfile.lines().map(str::trim).find(|l| l.starts_with("FROM ") && l.ends_with(" AS build"));
    let image = format!("FROM docker.io/library/rust:{version}-bookworm AS build");
    assert_eq!(from, Some(image.as_str()), "the image must build with the profile's rustc ({rustc})");
}

/// The shipped build refuses a profile trained with another rustc, before it builds anything;
/// `PORTCULLIS_PGO=0` is the way to build without it. (A stand-in `rustc` first on `PATH`
/// reports another version to `rustc -V` and hands everything else to the real one; the refusal
/// comes before cargo builds.)
#[test]
fn the_shipped_build_refuses_a_profile_trained_with_another_rustc() {
    use std::os::unix::fs::PermissionsExt as _;
    let real = std::process::Command::new("bash").args(["-c", "command -v rustc"]).output().expect("find rustc");
    let real = String::from_utf8(real.stdout).expect("utf-8").trim().to_owned();
    assert!(!real.is_empty(), "no rustc on PATH");
    let bin = tempfile::tempdir().expect("tempdir");
    let fake = bin.path().join("rustc");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\nif [ \"$1\" = -V ]; then echo 'rustc 0.0.1 (stand-in)'; else exec '{real}' \"$@\"; fi\n"),
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/release-dataplane.sh"))
        .arg(bin.path().join("never-built"))
        .env("PATH", path)
        .output()
        .expect("run the script");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("rustc 0.0.1 (stand-in)") && said.contains("PORTCULLIS_PGO=0"), "{said}");
    assert!(!bin.path().join("never-built").exists());
}

#[test]
fn the_dockerfile_reader_finds_stages_and_nothing_else() {
    let text = "FROM a AS build\nRUN x\n\n# c\nFROM b AS one\nUSER 1:1\nFROM c AS two\n";
    assert_eq!(stage(text, "one"), Some(vec!["USER 1:1"]));
    assert_eq!(stage(text, "build"), Some(vec!["RUN x"]));
    assert_eq!(stage(text, "three"), None);
}
