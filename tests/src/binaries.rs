//! The workspace's programs for tests that run them as separate processes.

use std::path::PathBuf;
use std::sync::OnceLock;

/// `target/<profile>/<name>` for `api` or `sms-worker`, built (or brought up to date) once per
/// test run: `cargo test` builds only the tested package's own binaries.
pub fn workspace_binary(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "api",
                "-p",
                "sms-worker",
                "--bins",
            ])
            // The checkout `cargo test` runs in, not the one this was compiled in: clones of
            // the repository may share one target directory (CI caches it outside the clone),
            // and a crate whose sources did not change is not rebuilt for another clone.
            .current_dir(
                std::env::var_os("CARGO_MANIFEST_DIR")
                    .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from),
            )
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building api and sms-worker failed");
        // A test binary is target/<profile>/deps/<name>-<hash>.
        let exe = std::env::current_exe().expect("the test binary has a path");
        exe.parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>")
            .to_path_buf()
    });
    let binary = dir.join(name);
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}
