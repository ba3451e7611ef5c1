//! Errors that cross the wire. Internal error chains are never serialised: a service maps its
//! error to an [`ApiError`] with a stable [`ErrorCode`] and a message for humans.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable error codes of the HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON or not the expected shape.
    MalformedBody,
    /// A field has a value that is not allowed; the message names the field.
    InvalidField,
    NotFound,
    /// The request is valid but the resource is not in a state that allows it (e.g. sending
    /// to an agent that is still working); the message says what to wait for.
    Conflict,
    Unauthorized,
    PayloadTooLarge,
    /// A dependency (NATS, Redis) did not answer.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(&self) -> u16 {
        match self {
            ErrorCode::MalformedBody | ErrorCode::InvalidField => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error response: `{"code": "...", "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An invalid value in `field`.
    pub fn field(field: &str, expected: impl fmt::Display) -> Self {
        Self::new(ErrorCode::InvalidField, format!("{field}: {expected}"))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}
