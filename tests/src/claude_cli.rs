//! The real Claude Code CLI for tests of the `claude-code` backend: `ORCH_CLAUDE_BIN`, else the
//! pinned copy `scripts/deps.sh` installs under `target/tools/claude-code` (as `scripts/test`
//! and `.ci/run` do). A missing CLI fails the test with how to install it: never a silent skip.

use std::path::PathBuf;

/// The version `scripts/deps.sh` installs.
pub const PINNED_VERSION: &str = "2.1.332";

/// Where `scripts/deps.sh` installs the CLI (the npm `--prefix`).
pub fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join("target/tools/claude-code")
}

/// The CLI binary; panics with the install command when it is missing.
pub fn claude_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_CLAUDE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "ORCH_CLAUDE_BIN={} is not a file: point it at the Claude Code CLI",
            p.display()
        );
        return p;
    }
    let dir = install_dir();
    let candidates = [
        // The native binary the npm package ships (works without its postinstall script).
        dir.join("node_modules/@anthropic-ai/claude-code-linux-x64/claude"),
        dir.join("node_modules/@anthropic-ai/claude-code/bin/claude.exe"),
        dir.join("node_modules/.bin/claude"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the Claude Code CLI is missing: the claude-code tests run the real CLI. Install it with \
                 `npm install --prefix {} --no-audit --no-fund @anthropic-ai/claude-code@{PINNED_VERSION}` \
                 (scripts/test does this), or set ORCH_CLAUDE_BIN",
                dir.display()
            )
        })
}
