//! Embeds the commit the binary is built from (`VQT_BUILD_REVISION`), with `-dirty` when the
//! sources that make it (crates/, Cargo.toml, Cargo.lock) differ from that commit, so a run
//! record names the code that actually ran, not whatever `HEAD` is when the run ends.

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<std::process::Output> {
    Command::new("git").arg("-C").arg(root).args(args).output().ok().filter(|o| o.status.success())
}

fn main() {
    // The manifest directory as cargo passes it to this run (not `env!`, which would keep the
    // path this script was first compiled at: a clone elsewhere sharing the target directory
    // left a deleted path there, git failed, and binaries went out without a revision).
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for build scripts");
    let root = Path::new(&manifest).join("../..");
    // Rerun when the commit or the sources change (cargo scans a directory recursively).
    // (Only paths that exist: a missing one would make cargo rerun this on every build.)
    for p in ["crates", "Cargo.toml", "Cargo.lock", ".git/HEAD", ".git/index"] {
        if root.join(p).exists() {
            println!("cargo:rerun-if-changed={}", root.join(p).display());
        }
    }
    let revision = git(&root, &["rev-parse", "HEAD"]).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).filter(|s| !s.is_empty());
    if let Some(rev) = revision {
        let dirty = git(&root, &["status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.toml", "Cargo.lock"]).map(|o| !o.stdout.is_empty()).unwrap_or(false);
        println!("cargo:rustc-env=VQT_BUILD_REVISION={rev}{}", if dirty { "-dirty" } else { "" });
    }
}
