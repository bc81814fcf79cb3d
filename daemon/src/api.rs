//! The HTTP/1.1 + JSON API on the Unix socket (see `proto/openapi.yaml`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sandbox_proto::{
    ApiError, CreateSandboxRequest, ErrorCode, ExecRequest, ImageList, ImportImageRequest,
    PruneImagesRequest, PullEvent, PullImageRequest, SandboxList, SandboxStatus, StopRequest,
    VersionInfo, WaitRequest,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::HttpError;
use crate::manager::Manager;

type St = State<Arc<Manager>>;
type Res<T> = Result<T, HttpError>;

/// Every route the server answers, as `(METHOD, path template)`; checked against the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/version"),
    ("GET", "/v1/sandboxes"),
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/{id}"),
    ("DELETE", "/v1/sandboxes/{id}"),
    ("POST", "/v1/sandboxes/{id}/stop"),
    ("POST", "/v1/sandboxes/{id}/wait"),
    ("POST", "/v1/sandboxes/{id}/exec"),
    ("POST", "/v1/sandboxes/{id}/exec/stream"),
    ("GET", "/v1/sandboxes/{id}/logs"),
    ("GET", "/v1/sandboxes/{id}/files"),
    ("PUT", "/v1/sandboxes/{id}/files"),
    ("GET", "/v1/sandboxes/{id}/logs/stream"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images/import"),
    ("GET", "/v1/images/{ref}"),
    ("DELETE", "/v1/images/{ref}"),
    ("POST", "/v1/images/pull"),
    ("POST", "/v1/images/prune"),
    ("GET", "/v1/system/df"),
];

/// Builds the router.
pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route(
            "/v1/sandboxes",
            get(list)
                .post(create)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::files::CREATE_BODY_LIMIT,
                )),
        )
        .route("/v1/sandboxes/{id}", get(get_one).delete(delete))
        .route("/v1/sandboxes/{id}/stop", post(stop))
        .route("/v1/sandboxes/{id}/wait", post(wait))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/sandboxes/{id}/exec/stream",
            post(crate::exec_stream::exec_stream),
        )
        .route("/v1/sandboxes/{id}/logs", get(logs))
        .route(
            "/v1/sandboxes/{id}/files",
            get(crate::files::read).put(crate::files::write),
        )
        .route("/v1/sandboxes/{id}/logs/stream", get(crate::logs::stream))
        .route("/v1/images", get(images))
        .route("/v1/images/import", post(import))
        .route("/v1/images/pull", post(pull))
        .route("/v1/images/prune", post(prune))
        .route("/v1/system/df", get(system_df))
        .route("/v1/images/{ref}", get(image).delete(remove_image))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(m)
}

/// Decodes a JSON body into `T`; an empty body means `T::default()` when `allow_empty`.
fn body<T: DeserializeOwned + Default>(b: &Bytes, allow_empty: bool) -> Result<T, HttpError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        if allow_empty {
            return Ok(T::default());
        }
        return Err(
            ApiError::new(ErrorCode::InvalidRequest, "the request needs a JSON body").into(),
        );
    }
    serde_json::from_slice(b).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("malformed JSON body: {e}"),
        )
        .into()
    })
}

async fn fallback(method: Method, uri: Uri) -> HttpError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route {method} {}", uri.path()),
    )
    .into()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let e = ApiError::new(
        ErrorCode::InvalidRequest,
        format!("method {method} is not allowed on {}", uri.path()),
    );
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(sandbox_proto::ErrorBody { error: e }),
    )
        .into_response()
}

async fn version(State(m): St) -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_version: "v1".to_owned(),
        cgroup_version: m.cgroup_version().to_owned(),
    })
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space, `%XX` a byte).
fn form_decode(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("malformed query string: {s:?}"),
        )
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// `?status=RUNNING,COMPLETED&tag=a&tag=b`: statuses (any of; repeatable or comma-separated) and tags
/// (all of). Other parameters are ignored.
async fn list(State(m): St, RawQuery(q): RawQuery) -> Res<Json<SandboxList>> {
    let mut statuses = Vec::new();
    let mut tags = Vec::new();
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match form_decode(k)?.as_str() {
            "status" => {
                for s in form_decode(v)?.split(',').filter(|s| !s.is_empty()) {
                    statuses.push(SandboxStatus::parse(s).ok_or_else(|| {
                        ApiError::invalid_argument("status", format!("unknown status {s:?}"))
                    })?);
                }
            }
            "tag" => tags.push(form_decode(v)?),
            _ => {}
        }
    }
    Ok(Json(SandboxList {
        sandboxes: m.list(&statuses, &tags).await,
    }))
}

async fn create(State(m): St, b: Bytes) -> Res<impl IntoResponse> {
    let req: CreateSandboxRequest = body(&b, false)?;
    let info = m.create(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn get_one(State(m): St, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(m.get(&id).await?))
}

#[derive(Deserialize, Default)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(m): St,
    Path(id): Path<String>,
    q: Result<Query<ForceQuery>, axum::extract::rejection::QueryRejection>,
) -> Res<StatusCode> {
    let Query(q) = q.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    m.delete(&id, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop(State(m): St, Path(id): Path<String>, b: Bytes) -> Res<impl IntoResponse> {
    let req: StopRequest = body(&b, true)?;
    Ok(Json(m.stop(&id, req.grace_seconds).await?))
}

async fn wait(State(m): St, Path(id): Path<String>, b: Bytes) -> Res<impl IntoResponse> {
    let req: WaitRequest = body(&b, true)?;
    Ok(Json(m.wait(&id, req.condition, req.timeout_seconds).await?))
}

async fn exec(State(m): St, Path(id): Path<String>, b: Bytes) -> Res<impl IntoResponse> {
    let req: ExecRequest = body(&b, false)?;
    Ok(Json(m.exec(&id, req).await?))
}

async fn logs(State(m): St, Path(id): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(m.logs(&id).await?))
}

async fn images(State(m): St) -> Res<Json<ImageList>> {
    Ok(Json(ImageList {
        images: m.images().await?,
    }))
}

async fn import(State(m): St, b: Bytes) -> Res<impl IntoResponse> {
    let req: ImportImageRequest = body(&b, false)?;
    Ok((StatusCode::CREATED, Json(m.import_image(req).await?)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullQuery {
    #[serde(default)]
    progress: bool,
}

async fn pull(
    State(m): St,
    q: Result<Query<PullQuery>, axum::extract::rejection::QueryRejection>,
    b: Bytes,
) -> Res<Response> {
    let Query(q) = q.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    let req: PullImageRequest = body(&b, false)?;
    if !q.progress {
        return Ok(Json(m.pull_image(req).await?).into_response());
    }
    let sub = m.pull_image_events(&req)?;
    let joined = sub.joined;
    // One JSON line per event: the snapshot of a pull joined midway, then live events up to the final one.
    struct Feed {
        snapshot: std::vec::IntoIter<PullEvent>,
        events: tokio::sync::broadcast::Receiver<PullEvent>,
        result: tokio::sync::watch::Receiver<Option<Result<sandbox_proto::PullResult, ApiError>>>,
        done: bool,
    }
    let feed = Feed {
        snapshot: sub.snapshot.into_iter(),
        events: sub.events,
        result: sub.result,
        done: false,
    };
    let stream = futures_util::stream::unfold(feed, move |mut f| async move {
        if f.done {
            return None;
        }
        let ev = match f.snapshot.next() {
            Some(ev) => ev,
            None => loop {
                match f.events.recv().await {
                    Ok(ev) => break ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // The pull ended before this stream saw its last event: answer its outcome.
                        let outcome = f.result.borrow().clone();
                        break match outcome {
                            Some(Ok(r)) => PullEvent::Done(r),
                            Some(Err(error)) => PullEvent::Error { error },
                            None => PullEvent::Error {
                                error: ApiError::new(
                                    ErrorCode::Internal,
                                    "the pull ended without an outcome",
                                ),
                            },
                        };
                    }
                }
            },
        };
        let ev = match ev {
            PullEvent::Done(mut r) => {
                f.done = true;
                r.joined = joined;
                PullEvent::Done(r)
            }
            e @ PullEvent::Error { .. } => {
                f.done = true;
                e
            }
            e => e,
        };
        let mut line = serde_json::to_vec(&ev).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), f))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn prune(State(m): St, b: Bytes) -> Res<impl IntoResponse> {
    let req: PruneImagesRequest = body(&b, true)?;
    Ok(Json(m.prune_images(req).await?))
}

async fn system_df(State(m): St) -> Res<impl IntoResponse> {
    Ok(Json(m.disk_usage().await?))
}

async fn image(State(m): St, Path(r): Path<String>) -> Res<impl IntoResponse> {
    Ok(Json(m.image(&r).await?))
}

async fn remove_image(
    State(m): St,
    Path(r): Path<String>,
    q: Result<Query<ForceQuery>, axum::extract::rejection::QueryRejection>,
) -> Res<impl IntoResponse> {
    let Query(q) = q.map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
    Ok(Json(m.remove_image(&r, q.force).await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_decoding() {
        assert_eq!(super::form_decode("a%20b+c%2Cd").unwrap(), "a b c,d");
        assert_eq!(super::form_decode("%C3%A9").unwrap(), "é");
        assert!(super::form_decode("%G1").is_err());
        assert!(super::form_decode("%4").is_err());
        assert!(super::form_decode("%FF").is_err());
    }

    #[test]
    fn routes_match_the_openapi_document() {
        let mut documented = sandbox_proto::client::openapi_routes(sandbox_proto::OPENAPI_YAML);
        documented.sort();
        let mut served: Vec<(String, String)> = super::ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        served.sort();
        assert_eq!(
            served, documented,
            "server routes and proto/openapi.yaml disagree"
        );
    }
}
