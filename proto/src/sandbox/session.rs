//! [`Session`]: sandboxes created from shared defaults, started on first use, ended together.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::client::Client;
use crate::types::SandboxStatus;

use super::error::SESSION_CLOSED;
use super::{Sandbox, SandboxDefaults, SandboxError, DEFAULT_GRACE_SECONDS};

/// The annotation that marks the sandboxes a session created (its value is the session's id); the
/// Python client uses the same one.
pub const SESSION_ANNOTATION: &str = "sandboxd.session";

/// Creates sandboxes from shared [`SandboxDefaults`] and ends them together.
///
/// [`Session::sandbox`] returns an unstarted sandbox that starts on its first operation (exec, a file
/// operation, a wait, logs). [`Session::close`] stops and deletes every sandbox the session started or
/// adopted ([`Session::from_id`]). Each carries the annotation [`SESSION_ANNOTATION`]`=<session id>`, by
/// which [`Session::list`] finds them.
///
/// Dropping a session that was not closed spawns its clean-up on the current tokio runtime, if there
/// is one (best effort: the runtime may end first); call [`Session::close`].
///
/// ```no_run
/// # async fn demo(client: &sandbox_proto::client::Client) -> Result<(), sandbox_proto::sandbox::SandboxError> {
/// use sandbox_proto::sandbox::{ExecOptions, SandboxDefaults, Session};
///
/// let session = Session::new(client, SandboxDefaults::default().with_tag("batch-job"));
/// let a = session.sandbox()?;
/// let b = session.sandbox_with(|d| d.with_container_image("python:3.12"))?;
/// a.exec(["echo", "hi"], ExecOptions::new()).await?.result(None).await?;
/// assert!(b.sandbox_id().is_none()); // never used: never created
/// session.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session {
    client: Client,
    defaults: SandboxDefaults,
    id: String,
    sandboxes: Mutex<Vec<Sandbox>>,
    closed: AtomicBool,
}

fn random_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

impl Session {
    /// A session creating its sandboxes with `defaults`.
    pub fn new(client: &Client, defaults: SandboxDefaults) -> Self {
        Self {
            client: client.clone(),
            defaults,
            id: random_id(),
            sandboxes: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The session's id (the value of its [`SESSION_ANNOTATION`]).
    pub fn session_id(&self) -> &str {
        &self.id
    }

    /// The defaults of the session's sandboxes.
    pub fn defaults(&self) -> &SandboxDefaults {
        &self.defaults
    }

    /// The sandboxes the session made or adopted (started or not).
    pub fn sandboxes(&self) -> Vec<Sandbox> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An unstarted sandbox with the session's defaults.
    pub fn sandbox(&self) -> Result<Sandbox, SandboxError> {
        self.sandbox_with(|d| d)
    }

    /// An unstarted sandbox with the session's defaults as changed by `overrides`
    /// (`|d| d.with_command(["python", "train.py"])`).
    pub fn sandbox_with(
        &self,
        overrides: impl FnOnce(SandboxDefaults) -> SandboxDefaults,
    ) -> Result<Sandbox, SandboxError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SandboxError::Validation {
                code: SESSION_CLOSED.to_owned(),
                message: "the session is closed".into(),
                field: None,
            });
        }
        let d = overrides(self.defaults.clone()).with_annotation(SESSION_ANNOTATION, &self.id);
        let sb = Sandbox::new(&self.client, Vec::<String>::new(), &d);
        self.lock().push(sb.clone());
        Ok(sb)
    }

    /// The started sandboxes of this session that still exist, oldest first.
    pub async fn list(&self) -> Result<Vec<Sandbox>, SandboxError> {
        self.list_filtered(&[], &[]).await
    }

    /// [`Session::list`], filtered by tags (all of them) and states (any of them).
    pub async fn list_filtered(
        &self,
        tags: &[&str],
        status: &[SandboxStatus],
    ) -> Result<Vec<Sandbox>, SandboxError> {
        let all = Sandbox::list(&self.client, tags, status).await?;
        Ok(all
            .into_iter()
            .filter(|s| {
                s.last_info().is_some_and(|i| {
                    i.annotations.get(SESSION_ANNOTATION).map(String::as_str)
                        == Some(self.id.as_str())
                })
            })
            .collect())
    }

    /// An existing sandbox, adopted by the session: it is stopped and deleted when the session closes.
    pub async fn from_id(&self, id: &str) -> Result<Sandbox, SandboxError> {
        let sb = Sandbox::from_id(&self.client, id).await?;
        self.lock().push(sb.clone());
        Ok(sb)
    }

    /// Stops (grace [`DEFAULT_GRACE_SECONDS`]) and deletes every sandbox the session started, all at
    /// once; answers the first error after trying them all. Later [`Session::sandbox`] calls fail.
    pub async fn close(&self) -> Result<(), SandboxError> {
        self.close_with_grace(DEFAULT_GRACE_SECONDS).await
    }

    /// [`Session::close`] with another grace period.
    pub async fn close_with_grace(
        &self,
        graceful_shutdown_seconds: f64,
    ) -> Result<(), SandboxError> {
        self.closed.store(true, Ordering::SeqCst);
        let todo = std::mem::take(&mut *self.lock());
        close_all(todo, graceful_shutdown_seconds).await
    }
}

pub(crate) async fn close_all(todo: Vec<Sandbox>, grace: f64) -> Result<(), SandboxError> {
    let tasks: Vec<_> = todo
        .into_iter()
        .filter(Sandbox::is_started)
        .map(|sb| tokio::spawn(async move { sb.close(grace).await }))
        .collect();
    let mut first = None;
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => Err(crate::client::ClientError::Protocol(format!(
                "a clean-up task failed: {e}"
            ))
            .into()),
        };
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let todo: Vec<Sandbox> = std::mem::take(&mut *self.lock())
            .into_iter()
            .filter(Sandbox::is_started)
            .collect();
        if todo.is_empty() {
            return;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            // Best effort: nobody is left to report an error to.
            h.spawn(async move {
                let _ = close_all(todo, DEFAULT_GRACE_SECONDS).await;
            });
        }
    }
}
