//! [`ModelServer`]: a local OpenAI-compatible chat-completions endpoint that
//! end-to-end tests point `llm` steps at.
//!
//! `POST /v1/chat/completions` (or `/chat/completions`) records the request as
//! a [`ModelRequest`] before anything else, then answers: 413 for a body over
//! 4 MiB, 400 for one that is not JSON, llama-cpp-python's 500 for a
//! `json_schema` response format while [`ModelServer::reject_json_schema`] is
//! on; otherwise the first matching queued [`ModelServer::script`] reply
//! (consumed), else the first matching [`ModelServer::always`] rule, else a
//! 500 "no scripted reply". Any other path answers 404 and is not recorded.
//!
//! All state lives in one `watch` channel: handlers mutate it with
//! `send_modify`, and the `wait_*` helpers subscribe and re-check their
//! condition on every change, so tests wait for events instead of sleeping.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::serve::Served;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Request bodies larger than this answer 413.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// What llama-cpp-python answers to `response_format.type == "json_schema"`.
const JSON_SCHEMA_REJECTION: &str = "1 validation error for CreateChatCompletionRequest\n\
    response_format.type\n  Input should be 'text' or 'json_object'";

/// One chat-completion request, as the server saw it.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The parsed request body; `Null` if it was not JSON (or too large).
    pub body: Value,
    /// The `Authorization` header, if present and valid UTF-8.
    pub authorization: Option<String>,
    /// The `Idempotency-Key` header, if present and valid UTF-8.
    pub idempotency_key: Option<String>,
    /// Every request header, names in lower case; repeated headers joined
    /// with `, `, values decoded lossily.
    pub headers: BTreeMap<String, String>,
    /// The status the server answered; 0 while in progress, or forever if
    /// the client hung up first.
    pub status: u16,
}

impl ModelRequest {
    /// `body.model`, if it is a string.
    pub fn model(&self) -> Option<&str> {
        self.body.get("model")?.as_str()
    }

    /// The content of the last message with role `user`: a string content
    /// as is, or the `text` of its `{"type": "text"}` parts joined by `\n`.
    pub fn last_user_message(&self) -> Option<String> {
        let messages = self.body.get("messages")?.as_array()?;
        let last = messages.iter().rev().find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
        match last.get("content")? {
            Value::String(text) => Some(text.clone()),
            Value::Array(parts) => {
                let texts = parts
                    .iter()
                    .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|part| part.get("text").and_then(Value::as_str));
                Some(texts.collect::<Vec<_>>().join("\n"))
            }
            _ => None,
        }
    }

    /// `body.response_format.type`, if it is a string.
    pub fn response_format_type(&self) -> Option<&str> {
        self.body.get("response_format")?.get("type")?.as_str()
    }

    /// `body.messages`; empty when missing or not an array.
    pub fn messages(&self) -> Vec<Value> {
        self.body.get("messages").and_then(Value::as_array).cloned().unwrap_or_default()
    }
}

/// What the server answers to one request; build with a constructor, then
/// adjust with the modifiers ([`Reply::when`], [`Reply::delay`], ...).
#[derive(Debug, Clone)]
pub struct Reply {
    kind: Kind,
    /// Substring the serialized `messages` array must contain.
    when: Option<String>,
    delay: Option<Duration>,
    hold: bool,
    /// `(prompt_tokens, completion_tokens)`; `None` omits `usage`.
    usage: Option<(u64, u64)>,
    /// `None` echoes the request's model.
    model: Option<String>,
    finish_reason: String,
}

#[derive(Debug, Clone)]
enum Kind {
    /// A completion: `content` (a string or null) and `(name, arguments)` calls.
    Message { content: Value, calls: Vec<(String, String)> },
    /// A non-completion answer with this status and body.
    Error { status: StatusCode, body: Value, retry_after: Option<u64> },
    /// 200 with exactly this body.
    Raw(Value),
}

impl Reply {
    fn new(kind: Kind, finish_reason: &str) -> Self {
        let finish_reason = finish_reason.to_owned();
        Self { kind, when: None, delay: None, hold: false, usage: Some((12, 8)), model: None, finish_reason }
    }

    fn calls(calls: Vec<(String, String)>) -> Self {
        Self::new(Kind::Message { content: Value::Null, calls }, "tool_calls")
    }

    /// An assistant message with this content; `finish_reason` `"stop"`.
    pub fn text(content: impl Into<String>) -> Self {
        Self::new(Kind::Message { content: Value::String(content.into()), calls: Vec::new() }, "stop")
    }

    /// An assistant message whose content is `value` serialized as JSON text.
    pub fn json(value: Value) -> Self {
        Self::text(value.to_string())
    }

    /// Tool calls `(function name, arguments)`; content `null`,
    /// `finish_reason` `"tool_calls"`. Each call gets the id `call_{n}`, with
    /// `n` unique over the server's life, and `arguments` serialized as text.
    pub fn tool_calls(calls: Vec<(&str, Value)>) -> Self {
        Self::calls(calls.into_iter().map(|(name, args)| (name.to_owned(), args.to_string())).collect())
    }

    /// One tool call whose `arguments` string is sent verbatim, so it may be
    /// malformed JSON.
    pub fn tool_call_raw(name: &str, arguments: &str) -> Self {
        Self::calls(vec![(name.to_owned(), arguments.to_owned())])
    }

    /// Answers `status` with exactly `body`.
    ///
    /// # Panics
    ///
    /// If `status` is not a valid HTTP status code (100..=999).
    pub fn status(status: u16, body: Value) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or_else(|_| panic!("Reply::status({status}): not a status"));
        Self::new(Kind::Error { status, body, retry_after: None }, "stop")
    }

    /// 429 with `Retry-After: {retry_after_secs}` and OpenAI's rate-limit body.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let body = json!({"error": {
            "message": "Rate limit reached",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }});
        let kind = Kind::Error { status: StatusCode::TOO_MANY_REQUESTS, body, retry_after: Some(retry_after_secs) };
        Self::new(kind, "stop")
    }

    /// 200 with exactly this body, for testing lenient decoding.
    pub fn raw(body: Value) -> Self {
        Self::new(Kind::Raw(body), "stop")
    }

    /// Matches only requests whose `messages` array, serialized as JSON,
    /// contains `contains` (so quotes and newlines appear escaped there).
    pub fn when(mut self, contains: impl Into<String>) -> Self {
        self.when = Some(contains.into());
        self
    }

    /// Sleeps `d` before answering (after any hold).
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }

    /// Waits for [`ModelServer::release`] (or stop) before answering.
    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// The completion's token usage; the default is 12 prompt, 8 completion.
    pub fn usage(mut self, prompt_tokens: u64, completion_tokens: u64) -> Self {
        self.usage = Some((prompt_tokens, completion_tokens));
        self
    }

    /// Omits the completion's `usage` field.
    pub fn without_usage(mut self) -> Self {
        self.usage = None;
        self
    }

    /// The completion's `model`; by default the request's model is echoed.
    pub fn model(mut self, name: impl Into<String>) -> Self {
        self.model = Some(name.into());
        self
    }

    /// The completion's `finish_reason`.
    pub fn finish_reason(mut self, reason: impl Into<String>) -> Self {
        self.finish_reason = reason.into();
        self
    }

    fn matches(&self, messages: &str) -> bool {
        self.when.as_deref().is_none_or(|needle| messages.contains(needle))
    }
}

/// Everything the server knows; the single source of truth behind the watch.
#[derive(Default)]
struct Log {
    requests: Vec<ModelRequest>,
    queue: VecDeque<Reply>,
    rules: Vec<Reply>,
    reject_json_schema: bool,
    answered: usize,
    in_flight: usize,
    max_in_flight: usize,
    /// Requests currently parked by [`Reply::hold`].
    held: usize,
    released: bool,
    /// Set on stop/drop: releases every hold so graceful shutdown can finish.
    stopping: bool,
    /// Last `chatcmpl-{n}` and `call_{n}` numbers handed out.
    completions: u64,
    calls: u64,
}

type Shared = Arc<watch::Sender<Log>>;

/// A scripted OpenAI-compatible server on `127.0.0.1:{random port}`.
///
/// Stops when dropped (without blocking) or through [`ModelServer::stop`],
/// which also waits for the server task to finish.
pub struct ModelServer {
    served: Served,
    log: Shared,
}

impl ModelServer {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    ///
    /// # Panics
    ///
    /// If the loopback socket cannot be bound (a broken test environment).
    pub async fn start() -> Self {
        let log: Shared = Arc::new(watch::Sender::new(Log::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(Arc::clone(&log));
        Self { served: Served::start(app).await, log }
    }

    /// Shuts down gracefully, releasing held requests, and waits until the
    /// server task has finished (in-flight delays still run to completion).
    pub async fn stop(mut self) {
        self.begin_shutdown();
        self.served.join().await;
    }

    /// The OpenAI base URL, `http://127.0.0.1:{port}/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr)
    }

    /// Queues `reply` to be played once, by the first request it matches;
    /// queued replies are tried in the order they were queued.
    pub fn script(&self, reply: Reply) {
        self.log.send_modify(|log| log.queue.push_back(reply));
    }

    /// [`ModelServer::script`] for each reply, in order.
    pub fn script_all(&self, replies: impl IntoIterator<Item = Reply>) {
        self.log.send_modify(|log| log.queue.extend(replies));
    }

    /// Adds a persistent rule, played whenever no queued reply matches.
    /// Rules are tried in the order they were added.
    pub fn always(&self, reply: Reply) {
        self.log.send_modify(|log| log.rules.push(reply));
    }

    /// While on, requests asking for `response_format.type == "json_schema"`
    /// answer 500 as llama-cpp-python does, without consuming a reply.
    pub fn reject_json_schema(&self, on: bool) {
        self.log.send_modify(|log| log.reject_json_schema = on);
    }

    /// Every request received, in arrival order, including rejected ones.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.log.borrow().requests.clone()
    }

    /// How many requests have been received.
    pub fn count(&self) -> usize {
        self.log.borrow().requests.len()
    }

    /// How many requests were answered with status 200.
    pub fn answered(&self) -> usize {
        self.log.borrow().answered
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.log.borrow().in_flight
    }

    /// The highest [`ModelServer::in_flight`] seen so far.
    pub fn max_in_flight(&self) -> usize {
        self.log.borrow().max_in_flight
    }

    /// Resolves once at least `n` requests have been received.
    pub async fn wait_for_requests(&self, n: usize) {
        self.wait_until(|log| log.requests.len() >= n).await;
    }

    /// Resolves once at least `n` requests are parked by [`Reply::hold`].
    pub async fn wait_for_held(&self, n: usize) {
        self.wait_until(|log| log.held >= n).await;
    }

    /// Lets every held request answer, now and later: once released, the
    /// server never holds again.
    pub fn release(&self) {
        self.log.send_modify(|log| log.released = true);
    }

    async fn wait_until(&self, done: impl FnMut(&Log) -> bool) {
        crate::serve::wait_until(&self.log, done).await;
    }

    fn begin_shutdown(&mut self) {
        self.log.send_modify(|log| log.stopping = true);
        self.served.shut_down();
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        // Signal only: the detached task finishes on its own.
        self.begin_shutdown();
    }
}

impl fmt::Debug for ModelServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelServer").field("addr", &self.served.addr).finish_non_exhaustive()
    }
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

/// Marks a request as held until dropped.
struct Held<'a>(&'a Shared);

impl<'a> Held<'a> {
    fn enter(log: &'a Shared) -> Self {
        log.send_modify(|log| log.held += 1);
        Self(log)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|log| log.held -= 1);
    }
}

async fn chat(State(log): State<Shared>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let _in_flight = InFlight::enter(&log);
    let parsed = body.as_ref().ok().and_then(|bytes| serde_json::from_slice::<Value>(bytes).ok());
    let text_header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
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
    let request = ModelRequest {
        body: parsed.clone().unwrap_or(Value::Null),
        authorization: text_header("authorization"),
        idempotency_key: text_header("idempotency-key"),
        headers: recorded_headers,
        status: 0,
    };
    let mut index = 0;
    log.send_modify(|log| {
        index = log.requests.len();
        log.requests.push(request);
    });

    let response = match (body, parsed) {
        (Err(rejection), _) => error(rejection.status(), &rejection.body_text(), "invalid_request_error"),
        (Ok(_), None) => error(StatusCode::BAD_REQUEST, "invalid JSON body", "invalid_request_error"),
        (Ok(_), Some(request)) => respond(&log, &request).await,
    };
    let status = response.status();
    log.send_modify(|log| {
        log.requests[index].status = status.as_u16();
        if status == StatusCode::OK {
            log.answered += 1;
        }
    });
    response
}

/// Picks the reply for a well-formed request, waits as it says, and renders it.
async fn respond(log: &Shared, request: &Value) -> Response {
    let wants_schema = request.pointer("/response_format/type").and_then(Value::as_str) == Some("json_schema");
    let messages = request.get("messages").unwrap_or(&Value::Null).to_string();
    let mut rejected = false;
    let mut picked = None;
    log.send_modify(|log| {
        if log.reject_json_schema && wants_schema {
            rejected = true;
        } else if let Some(at) = log.queue.iter().position(|reply| reply.matches(&messages)) {
            picked = log.queue.remove(at);
        } else {
            picked = log.rules.iter().find(|reply| reply.matches(&messages)).cloned();
        }
    });
    if rejected {
        return error(StatusCode::INTERNAL_SERVER_ERROR, JSON_SCHEMA_REJECTION, "internal_server_error");
    }
    let Some(reply) = picked else {
        let message = "model server: no scripted reply for this request";
        return error(StatusCode::INTERNAL_SERVER_ERROR, message, "server_error");
    };

    if reply.hold {
        let _held = Held::enter(log);
        let mut changes = log.subscribe();
        // Errs only if the sender is gone, which cannot happen while `log` lives.
        let _ = changes.wait_for(|log| log.stopping || log.released).await.map(drop);
    }
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    render(log, reply, request.get("model").and_then(Value::as_str))
}

fn render(log: &Shared, reply: Reply, request_model: Option<&str>) -> Response {
    let (content, calls) = match reply.kind {
        Kind::Raw(body) => return (StatusCode::OK, Json(body)).into_response(),
        Kind::Error { status, body, retry_after } => {
            let mut response = (status, Json(body)).into_response();
            if let Some(secs) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return response;
        }
        Kind::Message { content, calls } => (content, calls),
    };
    let (mut completion, mut first_call) = (0, 0);
    log.send_modify(|log| {
        log.completions += 1;
        completion = log.completions;
        first_call = log.calls + 1;
        log.calls += calls.len() as u64;
    });

    let mut message = json!({ "role": "assistant", "content": content });
    if !calls.is_empty() {
        let calls: Vec<Value> = (first_call..)
            .zip(calls)
            .map(|(n, (name, arguments))| {
                json!({
                    "id": format!("call_{n}"),
                    "type": "function",
                    "function": { "name": name, "arguments": arguments },
                })
            })
            .collect();
        message["tool_calls"] = Value::Array(calls);
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = reply.model.as_deref().or(request_model).unwrap_or("model-server");
    let mut body = json!({
        "id": format!("chatcmpl-{completion}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{ "index": 0, "message": message, "finish_reason": reply.finish_reason }],
    });
    if let Some((prompt, completion)) = reply.usage {
        body["usage"] = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
    }
    (StatusCode::OK, Json(body)).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    let message = format!("model server: no route for {method} {}; use POST /v1/chat/completions", uri.path());
    error(StatusCode::NOT_FOUND, &message, "invalid_request_error")
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (status, Json(json!({ "error": { "message": message, "type": kind } }))).into_response()
}
