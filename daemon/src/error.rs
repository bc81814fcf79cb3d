//! Errors as HTTP answers: every failure becomes an `ErrorBody` with a stable code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sandbox_proto::{ApiError, ErrorBody, ErrorCode};

/// An API error on its way out as a response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = %self.0.code, message = %self.0.message, "request failed");
        } else {
            tracing::debug!(code = %self.0.code, message = %self.0.message, "request refused");
        }
        (status, axum::Json(ErrorBody { error: self.0 })).into_response()
    }
}

/// Shorthand for an internal error with context.
pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{context}: {e}"))
}

/// Maps an image-store error to its API error.
pub fn image_error(e: sandbox_runtime::image::ImageError) -> ApiError {
    use sandbox_runtime::image::ImageError as E;
    if e.is_no_space() {
        return ApiError::new(ErrorCode::ResourceExhausted, format!("disk full: {e}"))
            .with_details(serde_json::json!({ "resource": "disk" }));
    }
    let (code, details) = match &e {
        E::NotFound(_) => (ErrorCode::ImageNotFound, None),
        E::DigestMismatch { .. } => (ErrorCode::DigestMismatch, None),
        E::HostileEntry { entry, .. } => (
            ErrorCode::HostileLayer,
            Some(serde_json::json!({ "entry": entry })),
        ),
        E::PlatformNotFound {
            wanted, available, ..
        } => (
            ErrorCode::PlatformNotFound,
            Some(serde_json::json!({ "platform": wanted, "available": available })),
        ),
        E::Io { .. } => (ErrorCode::Internal, None),
        _ => (ErrorCode::InvalidImage, None),
    };
    let err = ApiError::new(code, e.to_string());
    match details {
        Some(d) => err.with_details(d),
        None => err,
    }
}
