//! [`CounterServer`]: the "outside service" end-to-end tests point `http` steps at.
//!
//! One route, `ANY /hit/{name}`. Every request is recorded as a [`Call`] before
//! anything else happens, and query parameters shape the reply:
//!
//! | parameter           | effect |
//! |---------------------|---------------------------------------------------------------------|
//! | `hold_first=N`      | the first N calls to this name wait until [`CounterServer::release`] (or the client hangs up) |
//! | `delay_ms=N`        | sleep N ms before answering (after any hold) |
//! | `fail_first=N`      | the first N calls to this name answer 503 |
//! | `status=N`          | answer with status N (a non-2xx status gets the error body) |
//! | `redirect_to=URL`   | answer `redirect_status` (default 302) with `Location: URL`, verbatim (relative or any scheme) |
//! | `redirect_status=N` | the redirect's status; alone, `Location` is this request's own path and query (a loop) |
//!
//! A 2xx reply is `{"name", "count", "echo", "query"}`; an error reply is
//! `{"error", "count"}`; a redirect is `{"redirect", "count"}`. `count` is the
//! call's 1-based ordinal among calls to its name, so it does not depend on
//! how concurrent calls interleave. A redirect comes after any hold, delay or
//! `fail_first`, and wins over `status`.
//!
//! All state lives in one `watch` channel: handlers mutate it with
//! `send_modify`, and the `wait_*` helpers subscribe and re-check their
//! condition on every change, so tests wait for events instead of sleeping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::serve::Served;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

/// One request to `/hit/{name}`, as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub method: String,
    /// The `Idempotency-Key` request header, if present and valid UTF-8.
    pub idempotency_key: Option<String>,
    /// The body parsed as JSON; `Null` when empty; a JSON string holding the
    /// (lossily decoded) text when it is not JSON.
    pub body: Value,
    pub query: BTreeMap<String, String>,
    /// Every request header, names in lower case; repeated headers joined
    /// with `, `, values decoded lossily.
    pub headers: BTreeMap<String, String>,
    /// When the handler started, before any hold or delay.
    pub started_at: Instant,
    /// When the response was produced; `None` while in progress, or forever
    /// if the client hung up first.
    pub ended_at: Option<Instant>,
}

/// Everything the server knows; the single source of truth behind the watch.
#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    counts: HashMap<String, usize>,
    /// Calls currently parked by `hold_first`, per name.
    held: HashMap<String, usize>,
    released: HashSet<String>,
    in_flight: usize,
    max_in_flight: usize,
    /// Set on stop/drop: releases every hold so graceful shutdown can finish.
    stopping: bool,
}

type Shared = Arc<watch::Sender<Log>>;

/// A recording HTTP server on `127.0.0.1:{random port}`.
///
/// Stops when dropped (without blocking) or through [`CounterServer::stop`],
/// which also waits for the server task to finish.
pub struct CounterServer {
    served: Served,
    log: Shared,
}

impl CounterServer {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    ///
    /// # Panics
    ///
    /// If the loopback socket cannot be bound (a broken test environment).
    pub async fn start() -> Self {
        let log: Shared = Arc::new(watch::Sender::new(Log::default()));
        let app = Router::new().route("/hit/{name}", any(hit)).with_state(Arc::clone(&log));
        Self { served: Served::start(app).await, log }
    }

    /// Shuts down gracefully, releasing held calls, and waits until the
    /// server task has finished (in-flight delays still run to completion).
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.served.join().await;
    }

    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// `http://127.0.0.1:{port}{path}`; `path` should start with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.served.addr)
    }

    /// All calls, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.log.borrow().calls.clone()
    }

    /// Calls to `name`, in arrival order.
    pub fn calls_to(&self, name: &str) -> Vec<Call> {
        let log = self.log.borrow();
        log.calls.iter().filter(|c| c.name == name).cloned().collect()
    }

    /// How many calls to `name` have started.
    pub fn count(&self, name: &str) -> usize {
        count_of(&self.log.borrow(), name)
    }

    /// Requests being handled right now, over all names.
    pub fn in_flight(&self) -> usize {
        self.log.borrow().in_flight
    }

    /// The highest [`CounterServer::in_flight`] seen so far.
    pub fn max_in_flight(&self) -> usize {
        self.log.borrow().max_in_flight
    }

    /// Resolves once at least `n` calls to `name` have started.
    pub async fn wait_for_calls(&self, name: &str, n: usize) {
        self.wait_until(|log| count_of(log, name) >= n).await;
    }

    /// Resolves once a call to `name` is parked by `hold_first`.
    pub async fn wait_for_held(&self, name: &str) {
        self.wait_until(|log| log.held.get(name).is_some_and(|&n| n > 0)).await;
    }

    /// Resolves once no request is being handled.
    pub async fn wait_idle(&self) {
        self.wait_until(|log| log.in_flight == 0).await;
    }

    /// Lets held calls to `name` answer normally. Also applies to calls that
    /// arrive later: once released, a name is never held again.
    pub fn release(&self, name: &str) {
        self.log.send_modify(|log| {
            log.released.insert(name.to_owned());
        });
    }

    async fn wait_until(&self, done: impl FnMut(&Log) -> bool) {
        crate::serve::wait_until(&self.log, done).await;
    }

    fn begin_shutdown(&mut self) {
        self.log.send_modify(|log| log.stopping = true);
        self.served.shut_down();
    }
}

impl Drop for CounterServer {
    fn drop(&mut self) {
        // Signal only: the detached task finishes on its own.
        self.begin_shutdown();
    }
}

impl fmt::Debug for CounterServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CounterServer").field("addr", &self.served.addr).finish_non_exhaustive()
    }
}

fn count_of(log: &Log, name: &str) -> usize {
    log.counts.get(name).copied().unwrap_or(0)
}

/// Counts a request as in flight until dropped, which also happens when hyper
/// drops the handler future because the client hung up.
struct InFlight(Shared);

impl InFlight {
    fn enter(log: &Shared) -> Self {
        log.send_modify(|log| {
            log.in_flight += 1;
            log.max_in_flight = log.max_in_flight.max(log.in_flight);
        });
        Self(Arc::clone(log))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|log| log.in_flight -= 1);
    }
}

/// Marks a call to `name` as held until dropped.
struct Held<'a> {
    log: &'a Shared,
    name: &'a str,
}

impl<'a> Held<'a> {
    fn enter(log: &'a Shared, name: &'a str) -> Self {
        log.send_modify(|log| *log.held.entry(name.to_owned()).or_default() += 1);
        Self { log, name }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.log.send_modify(|log| {
            if let Some(n) = log.held.get_mut(self.name) {
                *n -= 1;
                if *n == 0 {
                    log.held.remove(self.name);
                }
            }
        });
    }
}

async fn hit(
    State(log): State<Shared>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&log);
    let echo = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    let recorded = match &echo {
        Value::Null if !body.is_empty() => Value::String(String::from_utf8_lossy(&body).into()),
        json => json.clone(),
    };
    let idempotency_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut recorded_headers = BTreeMap::<String, String>::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        recorded_headers
            .entry(name.as_str().to_owned())
            .and_modify(|all| {
                all.push_str(", ");
                all.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }

    let (mut index, mut count) = (0, 0);
    log.send_modify(|log| {
        let n = log.counts.entry(name.clone()).or_default();
        *n += 1;
        count = *n;
        index = log.calls.len();
        log.calls.push(Call {
            name: name.clone(),
            method: method.to_string(),
            idempotency_key,
            body: recorded,
            query: query.clone(),
            headers: recorded_headers,
            started_at: Instant::now(),
            ended_at: None,
        });
    });

    let response = respond(&log, &name, count, &uri, query, echo).await;
    log.send_modify(|log| log.calls[index].ended_at = Some(Instant::now()));
    response
}

async fn respond(
    log: &Shared,
    name: &str,
    count: usize,
    uri: &Uri,
    query: BTreeMap<String, String>,
    echo: Value,
) -> Response {
    let behaviour = match Behaviour::parse(&query) {
        Ok(behaviour) => behaviour,
        Err(message) => return error(StatusCode::BAD_REQUEST, message, count),
    };

    if count <= behaviour.hold_first {
        let _held = Held::enter(log, name);
        let mut changes = log.subscribe();
        // Errs only if the sender is gone, which cannot happen while `log` lives.
        let _ = changes.wait_for(|log| log.stopping || log.released.contains(name)).await.map(drop);
    }
    if let Some(delay) = behaviour.delay {
        tokio::time::sleep(delay).await;
    }
    if count <= behaviour.fail_first {
        let message = format!("failing the first {} calls", behaviour.fail_first);
        return error(StatusCode::SERVICE_UNAVAILABLE, message, count);
    }
    if let Some((status, location)) = &behaviour.redirect {
        let location = location.clone().unwrap_or_else(|| uri.to_string());
        let Ok(value) = HeaderValue::from_str(&location) else {
            return error(StatusCode::BAD_REQUEST, format!("redirect_to={location}: not a header value"), count);
        };
        let body = Json(json!({ "redirect": location, "count": count }));
        return (*status, [(header::LOCATION, value)], body).into_response();
    }
    if !behaviour.status.is_success() {
        let message = format!("status {} requested", behaviour.status.as_u16());
        return error(behaviour.status, message, count);
    }
    let body = json!({ "name": name, "count": count, "echo": echo, "query": query });
    (behaviour.status, Json(body)).into_response()
}

fn error(status: StatusCode, message: String, count: usize) -> Response {
    (status, Json(json!({ "error": message, "count": count }))).into_response()
}

/// The query parameters that shape a reply, parsed once.
struct Behaviour {
    delay: Option<Duration>,
    status: StatusCode,
    fail_first: usize,
    hold_first: usize,
    /// The status and `Location` of a redirect, if any; no `Location` means
    /// this request's own path and query.
    redirect: Option<(StatusCode, Option<String>)>,
}

impl Behaviour {
    fn parse(query: &BTreeMap<String, String>) -> Result<Self, String> {
        let status = match param::<u16>(query, "status")? {
            None => StatusCode::OK,
            Some(code) => StatusCode::from_u16(code).map_err(|e| format!("status: {e}"))?,
        };
        let redirect_to = query.get("redirect_to").cloned();
        let redirect = match param::<u16>(query, "redirect_status")? {
            None => redirect_to.map(|to| (StatusCode::FOUND, Some(to))),
            Some(code) => Some((StatusCode::from_u16(code).map_err(|e| format!("redirect_status: {e}"))?, redirect_to)),
        };
        Ok(Self {
            delay: param(query, "delay_ms")?.map(Duration::from_millis),
            status,
            fail_first: param(query, "fail_first")?.unwrap_or(0),
            hold_first: param(query, "hold_first")?.unwrap_or(0),
            redirect,
        })
    }
}

fn param<T: FromStr>(query: &BTreeMap<String, String>, key: &str) -> Result<Option<T>, String>
where
    T::Err: fmt::Display,
{
    query.get(key).map(|raw| raw.parse().map_err(|e| format!("{key}={raw}: {e}"))).transpose()
}

#[cfg(test)]
mod tests;
