//! How the coordinator and the workers reach NATS beyond its URL: TLS (a CA to trust, a client
//! certificate) and one way to authenticate (user and password, token, NKey seed or `.creds`
//! file). Both services flatten [`NatsArgs`] into their command line and keep [`NatsSettings`]
//! under the `nats` key of their settings (the `[nats]` table of the TOML file), so the flags,
//! variables and file keys are the same in both; [`NatsSettings::check`] gives the checked
//! [`Nats`].
//!
//! [`Nats::connect_options`] turns it into `async_nats::ConnectOptions`. It lives here, behind
//! the `nats` feature, because it is the one place both services can share without a copy: the
//! wire crate `orch-shared` must stay free of async-nats, and `orchctl`, which uses this crate
//! without the feature, never talks to NATS.

use crate::Error;
use serde::Deserialize;
use std::path::PathBuf;

/// How often a service pings its NATS server. Two pings without an answer end the connection
/// and the client moves to another server of the cluster: a server whose machine dropped off
/// the network (no reset comes back) is left after about three intervals, not the two minutes
/// async-nats's default interval gives.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The NATS connection flags, the same in both services (`#[command(flatten)]`). Each id is the
/// setting's key under `nats`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NatsArgs {
    /// PEM bundle of the CAs to trust for NATS over TLS (instead of the system roots).
    #[arg(
        long = "nats-ca-file",
        id = "nats.ca_file",
        value_name = "FILE",
        env = "ORCH_NATS_CA_FILE"
    )]
    pub ca_file: Option<String>,
    /// PEM client certificate for mutual TLS with NATS (with --nats-client-key).
    #[arg(
        long = "nats-client-cert",
        id = "nats.client_cert",
        value_name = "FILE",
        env = "ORCH_NATS_CLIENT_CERT"
    )]
    pub client_cert: Option<String>,
    /// PEM private key of --nats-client-cert.
    #[arg(
        long = "nats-client-key",
        id = "nats.client_key",
        value_name = "FILE",
        env = "ORCH_NATS_CLIENT_KEY"
    )]
    pub client_key: Option<String>,
    /// Refuse a NATS connection without TLS (implied by a `tls://` URL, a CA file or a client
    /// certificate).
    #[arg(
        long = "nats-tls-required",
        id = "nats.tls_required",
        env = "ORCH_NATS_TLS_REQUIRED"
    )]
    pub tls_required: bool,
    /// NATS user (with --nats-password). At most one NATS auth method may be set.
    #[arg(
        long = "nats-user",
        id = "nats.user",
        value_name = "USER",
        env = "ORCH_NATS_USER"
    )]
    pub user: Option<String>,
    /// Password of --nats-user.
    #[arg(
        long = "nats-password",
        id = "nats.password",
        value_name = "PASSWORD",
        env = "ORCH_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// NATS authentication token.
    #[arg(
        long = "nats-token",
        id = "nats.token",
        value_name = "TOKEN",
        env = "ORCH_NATS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// NATS NKey seed (`SU...`).
    #[arg(
        long = "nats-nkey",
        id = "nats.nkey",
        value_name = "SEED",
        env = "ORCH_NATS_NKEY",
        hide_env_values = true
    )]
    pub nkey: Option<String>,
    /// NATS `.creds` file (a user JWT and its NKey seed, from `nsc`).
    #[arg(
        long = "nats-creds-file",
        id = "nats.creds_file",
        value_name = "FILE",
        env = "ORCH_NATS_CREDS_FILE"
    )]
    pub creds_file: Option<String>,
}

/// The `nats` settings as the file spells them (`[nats]`), before [`NatsSettings::check`].
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    tls_required: bool,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey: Option<String>,
    creds_file: Option<PathBuf>,
}

// Written by hand so that no secret reaches a log through `{:?}`.
impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_required", &self.tls_required)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A secret setting: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(crate) fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How a service proves who it is to NATS (at most one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    UserPassword { user: String, password: Secret },
    Token(Secret),
    NKey(Secret),
    CredsFile(PathBuf),
}

/// The checked NATS connection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nats {
    pub ca_file: Option<PathBuf>,
    /// `(certificate, key)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
    pub auth: Option<NatsAuth>,
}

/// `--nats-*` as the flag spells a `nats` key.
fn flag(key: &str) -> String {
    format!("nats-{}", key.replace('_', "-"))
}

/// Refuses a file that is not there, naming the key and the path.
fn existing(key: &str, path: Option<PathBuf>) -> Result<Option<PathBuf>, Error> {
    match path {
        Some(p) if !p.is_file() => Err(Error::invalid(
            &flag(key),
            format!("no such file {}", p.display()),
        )),
        other => Ok(other),
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

impl NatsSettings {
    /// The checks: at most one auth method, a certificate with its key, files that exist.
    pub fn check(self) -> Result<Nats, Error> {
        let (user, password, token, nkey) = (
            non_empty(self.user),
            non_empty(self.password),
            non_empty(self.token),
            non_empty(self.nkey),
        );
        let set: Vec<&str> = [
            ("user", user.is_some() || password.is_some()),
            ("token", token.is_some()),
            ("nkey", nkey.is_some()),
            ("creds_file", self.creds_file.is_some()),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(key, _)| key)
        .collect();
        if set.len() > 1 {
            let keys: Vec<String> = set.iter().map(|k| flag(k)).collect();
            return Err(Error::invalid(
                &keys.join(", "),
                "at most one NATS auth method may be set",
            ));
        }
        let auth = match (user, password, token, nkey) {
            (Some(user), Some(password), ..) => Some(NatsAuth::UserPassword {
                user,
                password: Secret(password),
            }),
            (Some(_), None, ..) => {
                return Err(Error::invalid("nats-user", "needs nats-password too"));
            }
            (None, Some(_), ..) => {
                return Err(Error::invalid("nats-password", "needs nats-user too"));
            }
            (None, None, Some(token), _) => Some(NatsAuth::Token(Secret(token))),
            (None, None, None, Some(seed)) => Some(NatsAuth::NKey(Secret(seed))),
            (None, None, None, None) => {
                existing("creds_file", self.creds_file)?.map(NatsAuth::CredsFile)
            }
        };
        let client_cert = match (
            existing("client_cert", self.client_cert)?,
            existing("client_key", self.client_key)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(_), None) => {
                return Err(Error::invalid(
                    "nats-client-cert",
                    "needs nats-client-key too",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "nats-client-key",
                    "needs nats-client-cert too",
                ));
            }
            (None, None) => None,
        };
        Ok(Nats {
            ca_file: existing("ca_file", self.ca_file)?,
            client_cert,
            tls_required: self.tls_required,
            auth,
        })
    }
}

#[cfg(feature = "nats")]
impl Nats {
    /// The connect options of a service named `name` (its NATS client name). A `tls://` URL
    /// needs TLS by itself (async-nats reads the scheme); a CA file or a client certificate
    /// means TLS too, so a plain `nats://` URL is not silently used without it.
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, std::io::Error> {
        // async-nats keeps retrying refused credentials, as it does an unreachable server, and
        // logs each refusal in its own words; this says once which settings to check.
        let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .ping_interval(PING_INTERVAL)
            .event_callback(move |event| {
                let told = told.clone();
                async move {
                    if let async_nats::Event::ClientError(async_nats::ClientError::Other(e)) =
                        &event
                        && (e.contains("authorization violation") || e.contains("authentication"))
                        && !told.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::error!(
                            error = %e,
                            "NATS refused this service's credentials (check nats-user and \
                             nats-password, nats-token, nats-nkey or nats-creds-file); retrying"
                        );
                    }
                }
            });
        if self.tls_required || self.ca_file.is_some() || self.client_cert.is_some() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(match &self.auth {
            None => options,
            Some(NatsAuth::UserPassword { user, password }) => {
                options.user_and_password(user.clone(), password.expose().to_string())
            }
            Some(NatsAuth::Token(token)) => options.token(token.expose().to_string()),
            Some(NatsAuth::NKey(seed)) => options.nkey(seed.expose().to_string()),
            Some(NatsAuth::CredsFile(path)) => options.credentials_file(path).await?,
        })
    }
}

/// Publishes `payload` on `subject` with JetStream message id `msg_id` (and the trace context
/// `traceparent`, if any), and waits until the stream stored it: how both services put a job
/// message (a parked attempt) back in its queue.
#[cfg(all(feature = "nats", feature = "telemetry"))]
pub async fn publish_stored(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: String,
    payload: Vec<u8>,
    traceparent: Option<&str>,
) -> Result<(), async_nats::Error> {
    let mut publish = async_nats::jetstream::message::PublishMessage::build()
        .message_id(msg_id)
        .payload(payload.into());
    if let Some(headers) = crate::telemetry::nats_headers(traceparent) {
        publish = publish.headers(headers);
    }
    js.send_publish(subject.to_string(), publish).await?.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> NatsSettings {
        toml::from_str(toml).unwrap()
    }

    fn err(toml: &str) -> String {
        settings(toml).check().unwrap_err().to_string()
    }

    #[test]
    fn two_auth_methods_are_refused_naming_both() {
        assert_eq!(
            err("user = \"u\"\npassword = \"p\"\ntoken = \"t\""),
            "invalid configuration: nats-user, nats-token: at most one NATS auth method may be set"
        );
        assert_eq!(
            err("nkey = \"SU\"\ncreds_file = \"/x\""),
            "invalid configuration: nats-nkey, nats-creds-file: at most one NATS auth method may be set"
        );
    }

    #[test]
    fn half_pairs_and_missing_files_are_refused_naming_the_key() {
        assert_eq!(
            err("user = \"u\""),
            "invalid configuration: nats-user: needs nats-password too"
        );
        assert_eq!(
            err("password = \"p\""),
            "invalid configuration: nats-password: needs nats-user too"
        );
        let dir = std::env::temp_dir();
        let here = dir.join(format!("orch-config-nats-{}.pem", std::process::id()));
        std::fs::write(&here, "x").unwrap();
        let cert_only = format!("client_cert = {:?}", here.display().to_string());
        assert_eq!(
            err(&cert_only),
            "invalid configuration: nats-client-cert: needs nats-client-key too"
        );
        assert_eq!(
            err("ca_file = \"/no/such/ca.pem\""),
            "invalid configuration: nats-ca-file: no such file /no/such/ca.pem"
        );
        assert_eq!(
            err("creds_file = \"/no/such.creds\""),
            "invalid configuration: nats-creds-file: no such file /no/such.creds"
        );
        let both = format!(
            "client_cert = {0:?}\nclient_key = {0:?}\nca_file = {0:?}",
            here.display().to_string()
        );
        let nats = settings(&both).check().unwrap();
        assert_eq!(nats.client_cert, Some((here.clone(), here.clone())));
        let _ = std::fs::remove_file(&here);
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let nats = settings("user = \"u\"\npassword = \"hunter2\"")
            .check()
            .unwrap();
        assert!(!format!("{nats:?}").contains("hunter2"), "{nats:?}");
        let raw = settings("token = \"s3cret\"");
        assert!(!format!("{raw:?}").contains("s3cret"));
        assert_eq!(settings("").check().unwrap(), Nats::default());
    }
}
