//! The sandboxd wire contract.
//!
//! This crate holds the serde types exchanged over the daemon's Unix socket, the stable error codes,
//! image-reference normalisation, resource-quantity parsing, the OpenAPI document (`openapi.yaml`) and a
//! typed client. It has no Linux-specific code.

pub mod blocking;
pub mod client;
pub mod error;
pub mod exec_stream;
pub mod image_ref;
pub mod quantity;
pub mod sandbox;
pub mod stream;
pub mod types;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use image_ref::ImageRef;
pub use types::*;

/// The OpenAPI document of record for the HTTP API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/sandboxd/sandboxd.sock";

/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "SANDBOXD_SOCKET";

/// API version prefix of every route.
pub const API_PREFIX: &str = "/v1";
