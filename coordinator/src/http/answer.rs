//! How handlers answer and read their input: [`Failure`] maps every error to a status and a
//! `{code, message}` body; the parsers name the field at fault.

use crate::driver::ControlError;
use crate::metrics as m;
use crate::pipeline::TurnError;
use crate::transport;
use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::{JobId, TaskId};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// An error answer: status from the code, body `{code, message}`.
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl From<crate::state::Error> for Failure {
    fn from(e: crate::state::Error) -> Self {
        tracing::error!(error = %e, "storage error");
        Failure(ApiError::new(
            ErrorCode::Unavailable,
            "task storage (Redis) is unavailable; try again",
        ))
    }
}

impl From<transport::Error> for Failure {
    fn from(e: transport::Error) -> Self {
        tracing::error!(error = %e, "messaging error");
        Failure(ApiError::new(
            ErrorCode::Unavailable,
            "job queue (NATS) is unavailable; try again",
        ))
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NoTask(_) | ControlError::NoJob(..) | ControlError::NotDead(_) => {
                Failure(ApiError::new(ErrorCode::NotFound, e.to_string()))
            }
            ControlError::Turn(TurnError::NoJob(_)) => {
                Failure(ApiError::new(ErrorCode::NotFound, e.to_string()))
            }
            ControlError::Turn(_) | ControlError::Review(_) => {
                Failure(ApiError::new(ErrorCode::Conflict, e.to_string()))
            }
            ControlError::State(e) => e.into(),
            ControlError::Transport(e) => e.into(),
            ControlError::Closed => Failure(ApiError::new(
                ErrorCode::Unavailable,
                "the coordinator is shutting down; try again",
            )),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = self.0.code;
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        metrics::counter!(m::HTTP_ERRORS, "code" => status.as_str().to_string()).increment(1);
        (status, axum::Json(self.0)).into_response()
    }
}

pub type Answer<T> = Result<T, Failure>;

pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Answer<T> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("body: larger than the limit of {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("body: {}", rejection.body_text()),
            )
        }
    })?;
    // serde would also read a struct from a JSON array (by position); only objects are bodies.
    if let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        return Err(ApiError::new(ErrorCode::InvalidField, "body: expected a JSON object").into());
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let f = |msg: String| {
            if path == "." || path.is_empty() {
                format!("body: {msg}")
            } else {
                format!("{path}: {msg}")
            }
        };
        if inner.is_data() {
            // serde_json appends " at line L column C"; the field path already says where.
            let text = inner.to_string();
            let text = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(m, _)| m);
            Failure(ApiError::new(ErrorCode::InvalidField, f(text.to_string())))
        } else if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            // Valid JSON that serde reports as a syntax error: a value of the wrong kind for
            // an enum field (a number for `mode`, say).
            Failure(ApiError::new(
                ErrorCode::InvalidField,
                f("not one of the accepted values".into()),
            ))
        } else {
            Failure(ApiError::new(
                ErrorCode::MalformedBody,
                format!("body: not valid JSON: {inner}"),
            ))
        }
    })
}

pub fn parse_id(id: &str) -> Answer<TaskId> {
    id.parse()
        .map_err(|e: orch_shared::ids::IdError| ApiError::field("id", e).into())
}

pub fn field(name: &str, msg: impl std::fmt::Display) -> Failure {
    ApiError::field(name, msg).into()
}

pub fn query<T>(params: Result<Query<T>, QueryRejection>) -> Answer<T> {
    params.map(|Query(p)| p).map_err(|e| {
        ApiError::new(ErrorCode::InvalidField, format!("query: {}", e.body_text())).into()
    })
}

pub fn parse_job(id: &str) -> Answer<JobId> {
    id.parse()
        .map_err(|e: orch_shared::ids::IdError| field("id", e))
}

/// `a, b or c`: the accepted values, for an error message.
pub fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Splits `a,b,c` into values of an enum whose names strum derives (`Role`, `JobStatus`, ...),
/// naming `name` and every accepted value on error.
pub fn names_of<T: std::str::FromStr + strum::VariantNames>(
    name: &str,
    value: Option<&str>,
) -> Answer<Vec<T>> {
    list_of(name, value, |s| s.parse().ok(), &one_of(T::VARIANTS))
}

/// A listing's page size: `limit` (50 when absent), from 1 to 1000.
pub fn page_limit(limit: Option<usize>) -> Answer<usize> {
    let limit = limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(field("limit", "must be between 1 and 1000"));
    }
    Ok(limit)
}

/// Splits `a,b,c` and parses each part with `parse`, naming `name` on error.
pub fn list_of<T>(
    name: &str,
    value: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Answer<Vec<T>> {
    let Some(value) = value else {
        return Ok(vec![]);
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            parse(s)
                .ok_or_else(|| field(name, format!("unknown value `{s}` (expected {expected})")))
        })
        .collect()
}

pub fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    min: T,
    max: T,
) -> Answer<Option<T>> {
    match value {
        Some(v) if v < min || v > max => {
            Err(ApiError::field(field, format!("must be between {min} and {max}")).into())
        }
        v => Ok(v),
    }
}
