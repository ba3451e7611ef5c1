//! A real MCP server nobody here wrote, for the tests of the native tool loop's MCP tools: the
//! reference filesystem server from npm (`@modelcontextprotocol/server-filesystem`),
//! `ORCH_MCP_FILESYSTEM_BIN`, else the pinned copy `scripts/deps.sh` installs under
//! `target/tools/mcp-server-filesystem`. A missing server fails the test with how to install
//! it: never a silent skip.

use std::path::PathBuf;

/// The version `scripts/deps.sh` installs.
pub const PINNED_VERSION: &str = "2026.8.31";

/// Where `scripts/deps.sh` installs the server (the npm `--prefix`).
pub fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join("target/tools/mcp-server-filesystem")
}

/// The server's executable (it serves the directories given as arguments over stdio); panics
/// with the install command when it is missing.
pub fn filesystem_server() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_MCP_FILESYSTEM_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "ORCH_MCP_FILESYSTEM_BIN={} is not a file: point it at mcp-server-filesystem",
            p.display()
        );
        return p;
    }
    let dir = install_dir();
    let bin = dir.join("node_modules/.bin/mcp-server-filesystem");
    assert!(
        bin.is_file(),
        "the MCP filesystem server is missing: the MCP tests run the real server. Install it with \
         `npm install --prefix {} --no-audit --no-fund @modelcontextprotocol/server-filesystem@{PINNED_VERSION}` \
         (scripts/test does this), or set ORCH_MCP_FILESYSTEM_BIN",
        dir.display()
    );
    bin
}
