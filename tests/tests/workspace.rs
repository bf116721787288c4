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
