//! sandboxd: the API server, sandbox registry, lifecycle and persistence.
//!
//! The daemon never does namespace work itself: each sandbox is created and supervised by its own
//! supervisor process (`sandboxd shim`), and each exec runs through a fresh helper process
//! (`sandboxd exec-helper`), both from `sandbox-runtime`. The daemon keeps the registry, persists every
//! state change under the state directory before acting on it, and re-adopts running sandboxes when it
//! starts again.

pub mod api;
pub mod config;
pub mod dns;
pub mod error;
mod exec_stream;
pub mod files;
mod helper;
mod logs;
pub mod manager;
pub mod network;
pub mod pull;
pub mod resources;
pub mod time;
