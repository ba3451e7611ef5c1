//! Where orchctl finds its server and token.
//!
//! Precedence, highest first: the `--server`/`--token` flags, the `ORCH_SERVER`/`ORCH_TOKEN`
//! environment variables, the TOML config file (`server = "..."`, `token = "..."`), then the
//! default server [`DEFAULT_SERVER`] with no token. [`Settings::resolve`] stacks these layers
//! with [`orch_config::Loader`], each given as a [`FileConfig`] (the one struct of settings).
//!
//! The config file is `--config` / `ORCH_CONFIG`, else `$ORCH_HOME/config.toml`, with `ORCH_HOME`
//! defaulting to `$HOME/.orch`. Only [`Paths::from_env`] and [`FileConfig::from_env`] read the
//! process environment; everything else takes explicit values so tests never touch it.

use orch_config::Loader;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The coordinator address used when neither a flag, the environment nor the config file names one
/// (the coordinator's default listen address).
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find a home directory for orchctl: set ORCH_HOME or HOME")]
    NoHome,
    #[error("config file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("failed to read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("failed to write config file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid server url `{url}`: {reason}")]
    InvalidServer { url: String, reason: String },
    #[error(transparent)]
    Config(#[from] orch_config::Error),
}

/// The directories orchctl uses, resolved once from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// `$ORCH_HOME`, else `$HOME/.orch`; `None` when neither variable is set.
    pub home: Option<PathBuf>,
    /// The config file to read (and the one `local up` writes).
    pub config: Option<PathBuf>,
    /// Whether `config` was named explicitly (`--config` / `ORCH_CONFIG`): a missing explicit file
    /// is an error, a missing default one is not.
    pub config_is_explicit: bool,
}

impl Paths {
    /// Resolves the paths from the process environment and the `--config` value (which clap has
    /// already merged with `ORCH_CONFIG`).
    pub fn from_env(config_flag: Option<PathBuf>) -> Self {
        Self::new(
            config_flag,
            std::env::var_os("ORCH_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// Pure form of [`Paths::from_env`].
    pub fn new(
        config_flag: Option<PathBuf>,
        orch_home: Option<OsString>,
        home: Option<OsString>,
    ) -> Self {
        let home = non_empty_os(orch_home)
            .map(PathBuf::from)
            .or_else(|| non_empty_os(home).map(|h| PathBuf::from(h).join(".orch")));
        let config_flag = config_flag.filter(|p| !p.as_os_str().is_empty());
        let config_is_explicit = config_flag.is_some();
        let config = config_flag.or_else(|| home.as_ref().map(|h| h.join("config.toml")));
        Self {
            home,
            config,
            config_is_explicit,
        }
    }

    /// `$ORCH_HOME`, or an error telling the user how to set it.
    pub fn require_home(&self) -> Result<&Path, Error> {
        self.home.as_deref().ok_or(Error::NoHome)
    }

    /// The config file path, or an error telling the user how to set one.
    pub fn require_config(&self) -> Result<&Path, Error> {
        self.config.as_deref().ok_or(Error::NoHome)
    }
}

fn non_empty_os(v: Option<OsString>) -> Option<OsString> {
    v.filter(|v| !v.is_empty())
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// The settings as one layer gives them (the config file, the environment or the flags).
/// Unknown keys in the file are ignored so newer files keep working.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl FileConfig {
    /// `ORCH_SERVER` and `ORCH_TOKEN`.
    pub fn from_env() -> Self {
        Self {
            server: std::env::var("ORCH_SERVER").ok(),
            token: std::env::var("ORCH_TOKEN").ok(),
        }
    }

    /// Empty values count as unset, so an empty variable does not hide the file's value.
    fn set(self) -> Self {
        Self {
            server: non_empty(self.server),
            token: non_empty(self.token),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        toml::from_str(text).map_err(|source| Error::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads the config file named by `paths`; a missing default file is an empty config.
    pub fn load(paths: &Paths) -> Result<Self, Error> {
        let Some(path) = paths.config.as_deref() else {
            return Ok(Self::default());
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if paths.config_is_explicit {
                    Err(Error::Missing {
                        path: path.to_path_buf(),
                    })
                } else {
                    Ok(Self::default())
                }
            }
            Err(source) => Err(Error::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Where the token in use came from; decides what a "token refused" message tells the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `--token` or `ORCH_TOKEN`.
    Flag,
    /// The config file at this path.
    File(PathBuf),
    /// No token at all.
    None,
}

/// The checked settings every API command uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The coordinator's base URL, without a trailing slash.
    pub server: String,
    pub token: Option<String>,
    pub token_source: TokenSource,
    /// The config file that was (or would have been) read, for messages.
    pub config_path: Option<PathBuf>,
}

impl Settings {
    /// Applies the precedence rules: flags > environment > config file > default.
    pub fn resolve(
        flags: FileConfig,
        env: FileConfig,
        file: FileConfig,
        config_path: Option<&Path>,
    ) -> Result<Self, Error> {
        let defaults = FileConfig {
            server: Some(DEFAULT_SERVER.to_string()),
            token: None,
        };
        let layers = Loader::new()
            .serialized(orch_config::DEFAULTS, &defaults)?
            .serialized(orch_config::FILE, &file.set())?
            .serialized(orch_config::ENV, &env.set())?
            .serialized(orch_config::FLAGS, &flags.set())?;
        let merged: FileConfig = layers.extract()?;
        let server = normalize_server(merged.server.as_deref().unwrap_or(DEFAULT_SERVER))?;
        let token_source = match layers.source("token") {
            None => TokenSource::None,
            Some(orch_config::FILE) => {
                TokenSource::File(config_path.map(Path::to_path_buf).unwrap_or_default())
            }
            Some(_) => TokenSource::Flag,
        };
        Ok(Self {
            server,
            token: merged.token,
            token_source,
            config_path: config_path.map(Path::to_path_buf),
        })
    }

    /// What to tell a user whose token the server refused.
    pub fn auth_hint(&self) -> String {
        let config = self
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "$ORCH_HOME/config.toml".to_string());
        match &self.token_source {
            TokenSource::Flag => format!(
                "the coordinator at {} refused the token from --token/ORCH_TOKEN \
                 (check ORCH_TOKEN, or unset it to use the token in {config})",
                self.server
            ),
            TokenSource::File(path) => format!(
                "the coordinator at {} refused the token from {} \
                 (set ORCH_TOKEN or --token, or fix `token` in that file)",
                self.server,
                path.display()
            ),
            TokenSource::None => format!(
                "the coordinator at {} requires a token: set ORCH_TOKEN, pass --token, \
                 or put `token = \"...\"` in {config}",
                self.server
            ),
        }
    }
}

/// Checks that `url` is an http(s) URL and strips trailing slashes; a bare `host:port` gets
/// `http://` in front.
pub fn normalize_server(url: &str) -> Result<String, Error> {
    let url = url.trim();
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let parsed = reqwest::Url::parse(&with_scheme).map_err(|e| Error::InvalidServer {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::InvalidServer {
            url: url.to_string(),
            reason: format!(
                "unsupported scheme `{}` (use http or https)",
                parsed.scheme()
            ),
        });
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// Sets `server` and `token` in a config file's text, keeping every other key.
pub fn merge_settings(
    existing: &str,
    server: &str,
    token: &str,
) -> Result<String, toml::de::Error> {
    let mut table: toml::Table = if existing.trim().is_empty() {
        toml::Table::new()
    } else {
        existing.parse()?
    };
    table.insert("server".into(), toml::Value::String(server.to_string()));
    table.insert("token".into(), toml::Value::String(token.to_string()));
    Ok(table.to_string())
}

/// Writes `server` and `token` into the config file at `path` (creating it and its directory),
/// readable by the owner only since it holds a secret.
pub fn write_settings(path: &Path, server: &str, token: &str) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let write_err = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let text = merge_settings(&existing, server, token).map_err(|source| Error::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    // `mode` only applies to a new file; an existing one may have been world-readable.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(server: Option<&str>, token: Option<&str>) -> FileConfig {
        FileConfig {
            server: server.map(String::from),
            token: token.map(String::from),
        }
    }

    fn none() -> FileConfig {
        FileConfig::default()
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_config_file_which_beats_the_default() {
        let path = Some(Path::new("/c.toml"));
        let on_disk = || file(Some("http://file:2/"), Some("file-token"));
        let from_env = || file(Some("http://env:3"), Some("env-token"));
        let s = Settings::resolve(none(), none(), none(), None).unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!((s.token, s.token_source), (None, TokenSource::None));
        let s = Settings::resolve(none(), none(), on_disk(), path).unwrap();
        assert_eq!(s.server, "http://file:2");
        assert_eq!(s.token.as_deref(), Some("file-token"));
        assert_eq!(s.token_source, TokenSource::File(PathBuf::from("/c.toml")));
        let s = Settings::resolve(none(), from_env(), on_disk(), path).unwrap();
        assert_eq!(s.server, "http://env:3");
        assert_eq!(s.token.as_deref(), Some("env-token"));
        assert_eq!(s.token_source, TokenSource::Flag);
        let flags = file(Some("http://flag:1"), Some("flag-token"));
        let s = Settings::resolve(flags, from_env(), on_disk(), path).unwrap();
        assert_eq!(s.server, "http://flag:1");
        assert_eq!(s.token.as_deref(), Some("flag-token"));
    }

    #[test]
    fn each_value_falls_back_on_its_own() {
        let s = Settings::resolve(
            file(Some("http://flag:1"), None),
            none(),
            file(Some("http://file:2"), Some("file-token")),
            Some(Path::new("/c.toml")),
        )
        .unwrap();
        assert_eq!(s.server, "http://flag:1");
        assert_eq!(s.token.as_deref(), Some("file-token"));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let s = Settings::resolve(
            file(Some("  "), Some("")),
            file(Some(""), None),
            file(Some("http://file:2"), Some("t")),
            None,
        )
        .unwrap();
        assert_eq!(s.server, "http://file:2");
        assert_eq!(s.token.as_deref(), Some("t"));
    }

    #[test]
    fn a_bad_server_names_the_url() {
        let err = Settings::resolve(file(Some("ftp://x"), None), none(), none(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid server url `ftp://x`: unsupported scheme `ftp` (use http or https)"
        );
    }

    #[test]
    fn server_urls_are_checked_and_normalized() {
        assert_eq!(
            normalize_server("127.0.0.1:7070").unwrap(),
            "http://127.0.0.1:7070"
        );
        assert_eq!(
            normalize_server("https://orch.example/").unwrap(),
            "https://orch.example"
        );
        assert!(normalize_server("ftp://x").is_err());
        assert!(normalize_server("http://").is_err());
    }

    #[test]
    fn orch_home_defaults_to_dot_orch_in_home() {
        let p = Paths::new(None, None, Some("/home/u".into()));
        assert_eq!(p.home, Some(PathBuf::from("/home/u/.orch")));
        assert_eq!(p.config, Some(PathBuf::from("/home/u/.orch/config.toml")));
        assert!(!p.config_is_explicit);

        let p = Paths::new(None, Some("/srv/orch".into()), Some("/home/u".into()));
        assert_eq!(p.config, Some(PathBuf::from("/srv/orch/config.toml")));

        let p = Paths::new(Some("/etc/orch.toml".into()), None, Some("/home/u".into()));
        assert_eq!(p.config, Some(PathBuf::from("/etc/orch.toml")));
        assert!(p.config_is_explicit);

        let p = Paths::new(None, None, None);
        assert_eq!(p.config, None);
        assert!(p.require_home().is_err());
    }

    #[test]
    fn config_file_parses_and_ignores_unknown_keys() {
        let c = FileConfig::parse(
            "server = \"http://a:1\"\ntoken = \"abc\"\nfuture = 3\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c, file(Some("http://a:1"), Some("abc")));
        assert!(FileConfig::parse("server = ", Path::new("x")).is_err());
    }

    #[test]
    fn writing_settings_keeps_other_keys() {
        let text = merge_settings("server = \"old\"\nother = 1\n", "http://new:1", "tok").unwrap();
        let c = FileConfig::parse(&text, Path::new("x")).unwrap();
        assert_eq!(c, file(Some("http://new:1"), Some("tok")));
        assert!(text.contains("other = 1"));
    }

    #[test]
    fn auth_hint_names_where_the_token_came_from() {
        let s = Settings::resolve(
            none(),
            none(),
            file(None, Some("t")),
            Some(Path::new("/c.toml")),
        )
        .unwrap();
        assert!(s.auth_hint().contains("/c.toml"));
        let s = Settings::resolve(file(None, Some("t")), none(), none(), None).unwrap();
        assert!(s.auth_hint().contains("ORCH_TOKEN"));
        let s = Settings::resolve(none(), none(), none(), None).unwrap();
        assert!(s.auth_hint().contains("ORCH_TOKEN"));
    }
}
