//! Real MCP servers nobody here wrote, for the tests of the native tool loop's MCP tools: the
//! reference filesystem server from npm (`@modelcontextprotocol/server-filesystem`, over
//! stdio), `ORCH_MCP_FILESYSTEM_BIN`, else the pinned copy `scripts/deps.sh` installs under
//! `target/tools/mcp-server-filesystem`; and the reference "everything" server
//! (`@modelcontextprotocol/server-everything`, over streamable HTTP, [`EverythingServer`]),
//! `ORCH_MCP_EVERYTHING_BIN`, else the copy under `target/tools/mcp-server-everything`. A
//! missing server fails the test with how to install it: never a silent skip.

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

/// The version of the reference "everything" server `scripts/deps.sh` installs.
pub const EVERYTHING_VERSION: &str = "2026.8.31";

/// Where `scripts/deps.sh` installs the "everything" server (the npm `--prefix`).
pub fn everything_install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join("target/tools/mcp-server-everything")
}

/// The executable of the reference server that exercises every MCP feature
/// (`@modelcontextprotocol/server-everything`), which speaks streamable HTTP:
/// `ORCH_MCP_EVERYTHING_BIN`, else the pinned copy; panics with the install command when it is
/// missing.
pub fn everything_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_MCP_EVERYTHING_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "ORCH_MCP_EVERYTHING_BIN={} is not a file: point it at mcp-server-everything",
            p.display()
        );
        return p;
    }
    let dir = everything_install_dir();
    let bin = dir.join("node_modules/.bin/mcp-server-everything");
    assert!(
        bin.is_file(),
        "the MCP everything server is missing: the streamable HTTP MCP tests run the real server. \
         Install it with `npm install --prefix {} --no-audit --no-fund \
         @modelcontextprotocol/server-everything@{EVERYTHING_VERSION}` (scripts/test does this), \
         or set ORCH_MCP_EVERYTHING_BIN",
        dir.display()
    );
    bin
}

/// The "everything" server running in its streamable HTTP mode on a free port; killed on
/// drop. Its output goes to a log file, shown if it does not come up.
pub struct EverythingServer {
    /// Its MCP endpoint (`http://127.0.0.1:<port>/mcp`).
    pub url: String,
    pub port: u16,
    child: std::process::Child,
    _log: tempfile::NamedTempFile,
}

impl EverythingServer {
    /// Starts the server and waits until it accepts connections.
    pub async fn start() -> EverythingServer {
        let bin = everything_server_bin();
        let port = crate::free_port();
        let log = tempfile::NamedTempFile::new().expect("create the server's log file");
        let out = log.reopen().expect("open the server's log file");
        let err = out.try_clone().expect("open the server's log file");
        let child = std::process::Command::new(&bin)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let server = EverythingServer {
            url: format!("http://127.0.0.1:{port}/mcp"),
            port,
            child,
            _log: log,
        };
        let up = crate::poll_until(std::time::Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
        })
        .await;
        if let Err(e) = up {
            panic!(
                "the MCP everything server did not listen on port {port}: {e}; its output:\n{}",
                std::fs::read_to_string(server._log.path()).unwrap_or_default()
            );
        }
        server
    }

    /// What the server wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._log.path()).unwrap_or_default()
    }
}

impl Drop for EverythingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
