//! The admin API's one error type and the one place that maps causes to responses.
//! Every error is JSON `{"error": "..."}`; internal failures are logged with their detail
//! and answered without it.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cellgate_config::etcd::StoreError;
use cellgate_config::MutateError;

use crate::audit::AuditError;
use crate::control::ControlError;

/// An admin API error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Missing or wrong bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No such cell or path (404).
    #[error("{0}")]
    NotFound(String),
    /// Malformed request (400); the message names the problem.
    #[error("{0}")]
    BadRequest(String),
    /// The configuration changed under the request (409): re-read and retry.
    #[error("{0}")]
    Conflict(String),
    /// Refused by the traffic cap (422): repeat with `force=true`.
    #[error("{0}")]
    OverCap(String),
    /// The store or audit log is unavailable (503); nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// Something that should not happen (500); details are in the log.
    #[error("{0}")]
    Internal(String),
}

impl AppError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::OverCap(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "admin API internal error");
                "internal error; see the gateway log".to_owned()
            }
            other => other.to_string(),
        };
        let mut res = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "error": message }).to_string(),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"cellgate-admin\""),
            );
        }
        res
    }
}

impl From<ControlError> for AppError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Mutate(MutateError::UnknownCell { .. }) => Self::NotFound(e.to_string()),
            ControlError::Mutate(_) | ControlError::Build(_) => Self::BadRequest(e.to_string()),
            ControlError::Cap { .. } => Self::OverCap(e.to_string()),
            ControlError::Store(StoreError::Conflict { .. } | StoreError::LockBusy { .. })
            | ControlError::HeldByHealth { .. } => Self::Conflict(e.to_string()),
            ControlError::Store(StoreError::Refused(_)) => Self::BadRequest(e.to_string()),
            ControlError::Store(_) | ControlError::Audit(_) | ControlError::NotFromStore(_) => {
                Self::Unavailable(e.to_string())
            }
            ControlError::Persist(_) | ControlError::Internal(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<AuditError> for AppError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Store(_) => Self::Unavailable(e.to_string()),
            AuditError::File { .. } => Self::Internal(e.to_string()),
        }
    }
}
