//! Layered configuration for the orchestrator binaries (coordinator, worker, `orchctl`).
//!
//! A binary declares its settings once, as a serde struct with `#[serde(default)]` (the defaults)
//! and humantime-serde durations, and its command line as a clap struct whose args carry the
//! `env = "ORCH_..."` name and an id that is the setting's key (dotted for nested keys). A
//! [`Loader`] stacks, lowest first:
//!
//! 1. the struct's defaults,
//! 2. the TOML file (`--config`),
//! 3. the environment, read through a lookup function under the names the clap args declare,
//! 4. the flags given on the command line,
//!
//! with figment, and extracts the struct. Flag and environment values are strings; figment's
//! lossy extraction turns `"5"` into a number and `"true"` into a bool, so a bad value gets the
//! same message from every layer: `invalid configuration: job-ack-wait: expected a duration like
//! 30s or 5m, got "x"`. Tests pass a map as the environment and never touch the process's.
//!
//! [`nats`] holds the NATS connection settings (TLS, credentials) both services share,
//! [`telemetry`] their logging and OTLP trace export.

pub mod nats;
pub mod redis;
pub mod telemetry;

use clap::{ArgAction, ArgMatches, Command, parser::ValueSource};
use figment::error::{Actual, Kind};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A configuration that cannot be used; every variant prints as one line naming the key or file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// `key: what is wrong`.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Error {
    /// A value that does not pass a check: `invalid configuration: {key}: {message}`.
    pub fn invalid(key: &str, message: impl std::fmt::Display) -> Self {
        Self::Invalid(format!("{key}: {message}"))
    }
}

/// Parses `flags` (without the program name) against `command`; a bad flag is one line.
pub fn parse_flags<I, T>(command: Command, flags: I) -> Result<ArgMatches, Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from(command.get_name()))
        .chain(flags.into_iter().map(Into::into));
    command
        .try_get_matches_from(argv)
        .map_err(|e| Error::Invalid(e.to_string().lines().next().unwrap_or_default().into()))
}

/// Deserializes an `f64` setting exactly. Figment reads a short decimal string from a flag or
/// the environment (`"0.01"`) as an `f32` before widening it (0.009999999776...), so money
/// and other fractional settings take their string themselves:
/// `#[serde(deserialize_with = "orch_config::exact_f64")]`.
pub fn exact_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    d.deserialize_any(ExactF64)
}

/// [`exact_f64`] for an optional setting.
pub fn exact_f64_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    exact_f64(d).map(Some)
}

struct ExactF64;

impl serde::de::Visitor<'_> for ExactF64 {
    type Value = f64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<f64, E> {
        v.trim()
            .parse()
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
    }

    fn visit_f64<E>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_f32<E>(self, v: f32) -> Result<f64, E> {
        // Only a value that was an `f32` all along arrives here.
        Ok(f64::from(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
}

/// Where a setting's value came from (a layer's figment metadata name).
pub const DEFAULTS: &str = "defaults";
pub const FILE: &str = "file";
pub const ENV: &str = "environment";
pub const FLAGS: &str = "flags";

/// The stack of layers; see the crate docs.
#[derive(Debug, Default)]
pub struct Loader {
    figment: Figment,
}

impl Loader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a TOML file as the next layer.
    pub fn file(self, path: &Path) -> Result<Self, Error> {
        let table = read_toml(path)?;
        self.serialized(FILE, &table)
    }

    /// `text`, the contents of the TOML file at `path`, as the next layer.
    pub fn toml(self, text: &str, path: &Path) -> Result<Self, Error> {
        let table = parse_toml(text, path)?;
        self.serialized(FILE, &table)
    }

    /// A serializable value (a struct of the settings, `None`s skipped) as the next layer.
    pub fn serialized<T: serde::Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<Self, Error> {
        let dict = match figment::providers::Serialized::defaults(value).data() {
            Ok(mut data) => data.remove(&Profile::Default).unwrap_or_default(),
            Err(e) => return Err(describe(e)),
        };
        Ok(self.layer(name, dict))
    }

    /// Values as the next layer, under a name [`Loader::source`] reports.
    pub fn layer(mut self, name: &'static str, dict: Dict) -> Self {
        self.figment = self.figment.merge(Layer { name, dict });
        self
    }

    /// The environment layer, then the flag layer, of the settings `command` declares.
    ///
    /// Each arg's id is the key of its setting. The environment is read with `env` under the
    /// arg's `env` name (clap also reads it, for `--help` and parsing, but only values given on
    /// the command line are taken from `matches`, so `env` alone decides the environment layer).
    /// Args in `skip` (such as `config`) are not settings.
    pub fn args(
        self,
        command: &Command,
        matches: &ArgMatches,
        env: &dyn Fn(&str) -> Option<String>,
        skip: &[&str],
    ) -> Self {
        let mut from_env = Dict::new();
        let mut from_flags = Dict::new();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if skip.contains(&id)
                || matches!(
                    arg.get_action(),
                    ArgAction::Help
                        | ArgAction::HelpShort
                        | ArgAction::HelpLong
                        | ArgAction::Version
                )
            {
                continue;
            }
            let many = arg.get_value_delimiter().is_some()
                || matches!(arg.get_action(), ArgAction::Append);
            // An empty variable counts as unset, as clap has it.
            if let Some(value) = arg
                .get_env()
                .and_then(|name| env(&name.to_string_lossy()))
                .filter(|v| !v.is_empty())
            {
                let value = match arg.get_value_delimiter() {
                    Some(d) if many => {
                        Value::from(value.split(d).map(str::to_string).collect::<Vec<_>>())
                    }
                    _ if many => Value::from(vec![value]),
                    _ => Value::from(value),
                };
                insert(&mut from_env, id, value);
            }
            if matches.value_source(id) == Some(ValueSource::CommandLine) {
                let raw: Vec<String> = matches
                    .get_raw(id)
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                let value = if many {
                    Value::from(raw)
                } else if matches!(arg.get_action(), ArgAction::SetTrue) {
                    Value::from(true)
                } else {
                    match raw.into_iter().next() {
                        Some(v) => Value::from(v),
                        None => continue,
                    }
                };
                insert(&mut from_flags, id, value);
            }
        }
        self.layer(ENV, from_env).layer(FLAGS, from_flags)
    }

    /// The merged settings. Strings from the environment and flags become numbers and bools
    /// where the field wants one.
    pub fn extract<'a, T: Deserialize<'a>>(&self) -> Result<T, Error> {
        self.figment.extract_lossy().map_err(describe)
    }

    /// The name of the layer that gave `key` its value (`None`: no layer has it).
    pub fn source(&self, key: &str) -> Option<&str> {
        self.figment.find_metadata(key).map(|m| m.name.as_ref())
    }
}

/// Reads and parses a TOML file, for a binary that adjusts it (such as renaming an alias) before
/// it becomes the [`FILE`] layer with [`Loader::serialized`].
pub fn read_toml(path: &Path) -> Result<toml::Table, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

fn parse_toml(text: &str, path: &Path) -> Result<toml::Table, Error> {
    toml::from_str(text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        // toml's message spans several lines (a snippet of the file); the first says it.
        message: e.message().to_string(),
    })
}

/// Sets `key` (dotted for nested tables) in `dict`, merging with tables already there.
fn insert(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// One named layer of values.
struct Layer {
    name: &'static str,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// One line for the first of figment's errors: the key (its first part as the flag spells it),
/// what was expected and what was found, whatever layer the value came from.
fn describe(err: figment::Error) -> Error {
    let Some(err) = err.into_iter().next() else {
        return Error::Invalid("unknown error".into());
    };
    let mut path = err.path.clone();
    let message = match &err.kind {
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "expected {}, got {}",
                expected_text(expected),
                actual_text(actual)
            )
        }
        // figment's path already ends with the unknown key.
        Kind::UnknownField(..) => "unknown key".to_string(),
        Kind::UnknownVariant(found, expected) => {
            format!("expected {}, got {found:?}", expected.join(" or "))
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing".to_string()
        }
        Kind::Message(m) => m.clone(),
        other => other.to_string(),
    };
    Error::invalid(&key_text(&path), message)
}

/// `job_ack_wait` as `job-ack-wait` (its flag's spelling); nested keys as in the file.
fn key_text(path: &[String]) -> String {
    let mut parts = path.iter();
    let mut out = parts
        .next()
        .map(|first| first.replace('_', "-"))
        .unwrap_or_else(|| "config".into());
    for part in parts {
        out.push('.');
        out.push_str(part);
    }
    out
}

fn expected_text(expected: &str) -> &str {
    match expected {
        // humantime-serde's words; the example tells the user the syntax.
        "a duration" => "a duration like 30s or 5m",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, zero or more",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        other => other,
    }
}

fn actual_text(actual: &Actual) -> String {
    match actual {
        Actual::Str(s) => format!("{s:?}"),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        Actual::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// What the binaries' configuration tests share (feature `test-support`).
#[cfg(feature = "test-support")]
pub mod test_support {
    use super::Error;
    use clap::{ArgMatches, Command};
    use std::collections::HashMap;

    /// Loads a binary's configuration as its `main` would, from this config file text (if any,
    /// passed as `--config`), this environment (never the process's) and these flags.
    pub fn load_with<T>(
        command: Command,
        file: Option<&str>,
        env: &[(&str, &str)],
        flags: &[&str],
        load: impl FnOnce(&ArgMatches, &dyn Fn(&str) -> Option<String>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let path = dir.path().join("config.toml");
        let mut argv: Vec<String> = vec![];
        if let Some(text) = file {
            std::fs::write(&path, text).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            argv.extend(["--config".to_string(), path.display().to_string()]);
        }
        argv.extend(flags.iter().map(|f| f.to_string()));
        let matches = super::parse_flags(command, argv)?;
        let env: HashMap<&str, &str> = env.iter().copied().collect();
        load(&matches, &|name| env.get(name).map(|v| v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::collections::HashMap;
    use std::time::Duration;

    #[derive(Parser)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, env = "T_WAIT")]
        wait: Option<String>,
        #[arg(long, env = "T_COUNT")]
        count: Option<String>,
        #[arg(long, env = "T_NAMES", value_delimiter = ',')]
        names: Vec<String>,
        #[arg(long, env = "T_ON")]
        on: bool,
        #[arg(id = "nested.url", long = "url", env = "T_URL")]
        url: Option<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Settings {
        #[serde(with = "humantime_serde")]
        wait: Duration,
        count: u32,
        names: Vec<String>,
        on: bool,
        nested: Nested,
    }

    #[derive(Deserialize, Debug, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Nested {
        url: String,
        other: u32,
    }

    impl Default for Settings {
        fn default() -> Self {
            Self {
                wait: Duration::from_secs(1),
                count: 1,
                names: vec![],
                on: false,
                nested: Nested::default(),
            }
        }
    }

    fn load(file: &str, env: &[(&str, &str)], flags: &[&str]) -> Result<Settings, Error> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = std::iter::once("t").chain(flags.iter().copied());
        let matches = Args::command().try_get_matches_from(argv).unwrap();
        Loader::new()
            .toml(file, Path::new("t.toml"))?
            .args(
                &Args::command(),
                &matches,
                &|k| env.get(k).cloned(),
                &["config"],
            )
            .extract()
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
        let file =
            "wait = \"2s\"\ncount = 2\nnames = [\"file\"]\n[nested]\nurl = \"file\"\nother = 7\n";
        let s = load(file, &[], &[]).unwrap();
        assert_eq!(
            (s.wait, s.count, s.nested.other),
            (Duration::from_secs(2), 2, 7)
        );
        let s = load(
            file,
            &[
                ("T_WAIT", "3s"),
                ("T_NAMES", "a,b"),
                ("T_URL", "env"),
                ("T_COUNT", ""),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.count, 2);
        assert_eq!(s.wait, Duration::from_secs(3));
        assert_eq!(s.names, ["a", "b"]);
        assert_eq!(s.nested.url, "env");
        // A nested flag replaces one key and keeps the file's others.
        assert_eq!(s.nested.other, 7);
        let s = load(
            file,
            &[("T_WAIT", "3s"), ("T_COUNT", "3"), ("T_ON", "true")],
            &["--wait", "4s", "--names", "x", "--url", "flag"],
        )
        .unwrap();
        assert_eq!((s.wait, s.count, s.on), (Duration::from_secs(4), 3, true));
        assert_eq!(s.names, ["x"]);
        assert_eq!(s.nested.url, "flag");
        assert_eq!(load("", &[], &[]).unwrap(), Settings::default());
    }

    #[test]
    fn a_bad_value_gets_the_same_message_from_every_layer() {
        let want = "invalid configuration: wait: expected a duration like 30s or 5m, got \"x\"";
        let err = |file: &str, env: &[(&str, &str)], flags: &[&str]| {
            load(file, env, flags).unwrap_err().to_string()
        };
        assert_eq!(err("wait = \"x\"", &[], &[]), want);
        assert_eq!(err("", &[("T_WAIT", "x")], &[]), want);
        assert_eq!(err("", &[], &["--wait", "x"]), want);
        assert_eq!(
            err("", &[], &["--count", "many"]),
            "invalid configuration: count: expected a whole number, zero or more, got \"many\""
        );
        assert_eq!(
            err("[nested]\nurl = 5", &[], &[]),
            "invalid configuration: nested.url: expected a string, got 5"
        );
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named() {
        let err = load("[nested]\nulr = \"x\"", &[], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid configuration: nested.ulr: unknown key");
        let err = load("wait = ", &[], &[]).unwrap_err().to_string();
        assert!(err.starts_with("invalid config file t.toml: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
