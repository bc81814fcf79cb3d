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
    let code = match &e {
        E::NotFound(_) => ErrorCode::ImageNotFound,
        E::DigestMismatch { .. } => ErrorCode::DigestMismatch,
        E::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ErrorCode::ResourceExhausted
        }
        E::Io { .. } => ErrorCode::Internal,
        _ => ErrorCode::InvalidImage,
    };
    ApiError::new(code, e.to_string())
}
