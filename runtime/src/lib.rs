//! sandboxd's Linux isolation layer. Synchronous, except the netlink calls of [`net::link`] (rtnetlink is
//! async: the daemon calls them on its runtime, the supervisor on a current-thread runtime it drops at once).
//!
//! - [`image`]: the content-addressed image store (import, verify, unpack with in-root path resolution).
//! - [`cgroups`]: one cgroup per sandbox under the daemon's own parent, v1 and v2.
//! - [`seccomp`]: the default seccomp filter.
//! - [`spec`]: what the daemon hands a sandbox's supervisor.
//! - [`shim`]: the per-sandbox supervisor and the sandbox's init.
//! - [`logs`]: the main process's bounded, timestamped log (written by the supervisor, read by the daemon).
//! - [`files`]: reading and writing files of a running sandbox from the host, resolved inside its root.
//! - [`mounts`]: mounted files and scratch volumes, set up by the sandbox's init.
//! - [`net`]: the bridge, each sandbox's veth (made by its supervisor) and sandboxd's nftables table.
//! - [`exec`]: the helper that enters a running sandbox and runs a command in it.
//! - [`sys`]: the few raw syscalls the crates above do not wrap, each behind a small safe function.

pub mod cgroups;
pub mod exec;
pub mod files;
pub mod image;
pub mod logs;
pub mod mounts;
pub mod net;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod sys;
