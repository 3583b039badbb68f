//! The language-model adapter: any OpenAI-compatible chat-completions
//! server (OpenAI, vLLM, Ollama, llama.cpp, LM Studio) through async-openai.
//!
//! - Calls are non-streaming and both sides are JSON values (async-openai's
//!   bring-your-own-types calls), read leniently: an unknown
//!   `finish_reason`, a missing `object`, `null` content beside tool calls
//!   or a missing `usage` never fail a call.
//! - The HTTP exchange is the project's reqwest client wrapped in a small
//!   tower service ([`Exchange`]) that bounds the body and keeps the status
//!   and `Retry-After` of a failure, which async-openai's own errors drop.
//! - No retries here: the steps journal every attempt and wait durably.
//! - Each [`Provider`] has limits ([`Limits`]) that queue requests, fairly
//!   across runs, for every run in the process.
//! - Structured output is asked as `json_schema`; a server that refuses it
//!   is asked `json_object` (with the schema), then with the schema in the
//!   prompt only. What a provider accepts is learnt once and kept.
//!
//! The API key lives in the provider's async-openai config only: it is not
//! in any error message (server messages are scrubbed of it too) or log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::traits::RequestOptionsBuilder;
use async_trait::async_trait;
use serde_json::{Map, Value, json};
use switchyard_steps::llm::{
    ChatRequest, ChatResponse, LanguageModel, LlmError, Message, Role, StructuredMode, ToolCall, Usage,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Largest model response read.
const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// Longest server error text kept in a message.
const MAX_ERROR_TEXT: usize = 300;

/// An API key. Shown nowhere: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Refuses a key that could not travel in a header (or would break one).
    pub fn new(key: impl Into<String>) -> Result<Self, String> {
        let key = key.into();
        if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err("the API key has characters that cannot be sent in a header".to_owned());
        }
        Ok(Self(key))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How much a provider may be asked at once. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub max_concurrent: Option<usize>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// A named OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    pub name: String,
    /// Up to and including the version, e.g. `https://api.openai.com/v1`
    /// or `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub api_key: ApiKey,
    /// Used by steps that name no model.
    pub default_model: String,
    pub limits: Limits,
    /// What kind of server it is (`openai`, `ollama`, `vllm`, ...), for
    /// telemetry's `gen_ai.provider.name`.
    pub system: String,
}

impl ProviderConfig {
    /// The provider `default` from the environment: `OPENAI_BASE_URL`
    /// (default `https://api.openai.com/v1`), `OPENAI_API_KEY` (may be
    /// empty for local servers), `SWITCHYARD_LLM_MODEL` (default
    /// `gpt-4o-mini`), and the limits `SWITCHYARD_LLM_MAX_CONCURRENT`,
    /// `SWITCHYARD_LLM_REQUESTS_PER_MINUTE`, `SWITCHYARD_LLM_TOKENS_PER_MINUTE`.
    /// Errors name the variable, never its value.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let base_url = var("OPENAI_BASE_URL").filter(|v| !v.trim().is_empty());
        let base_url = base_url.unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
        let parsed = reqwest::Url::parse(base_url.trim()).map_err(|e| format!("OPENAI_BASE_URL is not a URL ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("OPENAI_BASE_URL must be an http or https URL".to_owned());
        }
        let api_key = ApiKey::new(var("OPENAI_API_KEY").unwrap_or_default().trim())
            .map_err(|e| format!("OPENAI_API_KEY: {e}"))?;
        let default_model = var("SWITCHYARD_LLM_MODEL").filter(|m| !m.trim().is_empty());
        let number = |name: &str| -> Result<Option<u64>, String> {
            match var(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(0) | Err(_) => Err(format!("{name} must be a whole number of at least 1 (got {v:?})")),
                    Ok(n) => Ok(Some(n)),
                },
            }
        };
        let limits = Limits {
            max_concurrent: number("SWITCHYARD_LLM_MAX_CONCURRENT")?.map(|n| n.min(1 << 20) as usize),
            requests_per_minute: number("SWITCHYARD_LLM_REQUESTS_PER_MINUTE")?.map(|n| n.min(u32::MAX as u64) as u32),
            tokens_per_minute: number("SWITCHYARD_LLM_TOKENS_PER_MINUTE")?,
        };
        let system = match var("SWITCHYARD_LLM_PROVIDER").map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
            None => "openai".to_owned(),
            Some(v)
                if v.len() <= 32
                    && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) =>
            {
                v
            }
            Some(_) => {
                return Err(
                    "SWITCHYARD_LLM_PROVIDER must be a short lower-case name such as openai, ollama or vllm".to_owned()
                );
            }
        };
        Ok(Self {
            name: "default".to_owned(),
            base_url: base_url.trim().trim_end_matches('/').to_owned(),
            api_key,
            default_model: default_model.unwrap_or_else(|| "gpt-4o-mini".to_owned()).trim().to_owned(),
            limits,
            system,
        })
    }
}

/// The providers a process knows, by name: the [`LanguageModel`] the model
/// steps are given.
pub struct Providers {
    by_name: HashMap<String, Arc<Provider>>,
}

impl Providers {
    pub fn new(http: reqwest::Client, configs: Vec<ProviderConfig>) -> Self {
        let by_name = configs
            .into_iter()
            .map(|config| (config.name.clone(), Arc::new(Provider::new(http.clone(), config))))
            .collect();
        Self { by_name }
    }
}

#[async_trait]
impl LanguageModel for Providers {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let name = request.provider.as_deref().unwrap_or("default");
        let provider = self.by_name.get(name).ok_or_else(|| LlmError::UnknownProvider(name.to_owned()))?;
        provider.chat(request).await
    }
}

/// One endpoint with its client, limits and what it was found to accept.
pub struct Provider {
    config: ProviderConfig,
    client: async_openai::Client<OpenAIConfig>,
    gate: Gate,
    window: Mutex<Window>,
    /// The [`StructuredMode`] this server accepts, as learnt (starts at
    /// `json_schema`).
    structured: AtomicU8,
    /// `host:port` of the base URL (telemetry's `server.address`).
    server: String,
}

impl Provider {
    pub fn new(http: reqwest::Client, config: ProviderConfig) -> Self {
        let openai = OpenAIConfig::new().with_api_base(config.base_url.clone()).with_api_key(config.api_key.0.clone());
        // `build`, not `with_config`: that would make (and load the root
        // certificates of) a second reqwest client.
        let client = async_openai::Client::build(http.clone(), openai).with_http_service(Exchange { client: http });
        let server = reqwest::Url::parse(&config.base_url)
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_default();
        Self {
            server,
            gate: Gate::new(config.limits.max_concurrent),
            window: Mutex::new(Window::default()),
            structured: AtomicU8::new(0),
            client,
            config,
        }
    }

    pub async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        let model = request.model.clone().unwrap_or_else(|| self.config.default_model.clone());
        let input = input_estimate(&request);
        let estimate = input + u64::from(request.max_tokens.unwrap_or(256));
        // Queue for the limits; the timeout counts from the first byte sent.
        let _permit = self.gate.acquire(fair_key(&request.caller)).await;
        let slot = self.admit(estimate).await;
        let started = Instant::now();
        let result =
            tokio::time::timeout(request.timeout, self.exchange(&request, &model)).await.unwrap_or_else(|_| {
                Err(LlmError::Unavailable {
                    message: format!("no answer within {}", humantime_secs(request.timeout)),
                    retry_after: None,
                })
            });
        let latency_ms = started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        let (body, mode) = match result {
            Ok(ok) => ok,
            Err(e) => {
                self.settle(slot, input);
                return Err(self.scrub(e));
            }
        };
        let mut response =
            read_completion(&body, &model, &self.config.name, &request, mode, latency_ms).map_err(|e| self.scrub(e))?;
        response.system = self.config.system.clone();
        response.server = self.server.clone();
        self.settle(slot, response.usage.total());
        Ok(response)
    }

    /// Sends the request, stepping down the structured-output mode when the
    /// server refuses the current one.
    async fn exchange(&self, request: &ChatRequest, model: &str) -> Result<(Value, Option<StructuredMode>), LlmError> {
        loop {
            let mode = request.answer_schema.as_ref().map(|_| self.mode());
            let body = request_body(request, model, mode);
            let chat = self.client.chat();
            let chat = if request.idempotency_key.is_empty() {
                chat
            } else {
                chat.header("Idempotency-Key", request.idempotency_key.as_str())
                    .map_err(|e| LlmError::Rejected(format!("idempotency key: {e}")))?
            };
            let chat = match &request.traceparent {
                Some(tp) => chat
                    .header("traceparent", tp.as_str())
                    .map_err(|e| LlmError::Rejected(format!("traceparent: {e}")))?,
                None => chat,
            };
            match chat.create_byot::<Value, Value>(body).await {
                Ok(answer) => return Ok((answer, mode)),
                Err(e) => {
                    let failure = Failure::from(e);
                    if let Some(mode) = mode
                        && failure.refuses_response_format()
                        && let Some(next) = step_down(mode)
                    {
                        tracing::info!(provider = %self.config.name, from = ?mode, to = ?next, "structured output refused; stepping down");
                        // Another caller may have stepped down already.
                        let _ = self.structured.compare_exchange(
                            mode_code(mode),
                            mode_code(next),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        continue;
                    }
                    return Err(failure.into_error(&self.config.name));
                }
            }
        }
    }

    fn mode(&self) -> StructuredMode {
        match self.structured.load(Ordering::Relaxed) {
            0 => StructuredMode::JsonSchema,
            1 => StructuredMode::JsonObject,
            _ => StructuredMode::Prompt,
        }
    }

    /// Waits until the per-minute limits allow a request of `tokens`
    /// (an estimate) and records it; returns its slot in the window.
    async fn admit(&self, tokens: u64) -> u64 {
        let Limits { requests_per_minute: rpm, tokens_per_minute: tpm, .. } = self.config.limits;
        if rpm.is_none() && tpm.is_none() {
            return 0;
        }
        loop {
            let wait = {
                let mut window = self.window.lock().expect("window");
                let now = Instant::now();
                window.expire(now);
                let requests_ok = rpm.is_none_or(|rpm| window.entries.len() < rpm as usize);
                // A request larger than the whole budget goes alone.
                let tokens_ok = tpm.is_none_or(|tpm| window.entries.is_empty() || window.tokens + tokens <= tpm);
                if requests_ok && tokens_ok {
                    return window.push(now, tokens);
                }
                window.entries.front().map(|e| e.at + MINUTE).unwrap_or(now)
            };
            tokio::time::sleep_until(wait).await;
        }
    }

    /// Replaces a request's estimate with what it used.
    fn settle(&self, slot: u64, tokens: u64) {
        if slot == 0 {
            return;
        }
        self.window.lock().expect("window").settle(slot, tokens);
    }

    /// Takes the API key out of a message a server may have echoed it in.
    fn scrub(&self, error: LlmError) -> LlmError {
        let key = &self.config.api_key.0;
        if key.len() < 4 {
            return error;
        }
        let clean = |m: String| m.replace(key.as_str(), "[redacted]");
        match error {
            LlmError::Rejected(m) => LlmError::Rejected(clean(m)),
            LlmError::Malformed(m) => LlmError::Malformed(clean(m)),
            LlmError::Unavailable { message, retry_after } => {
                LlmError::Unavailable { message: clean(message), retry_after }
            }
            other => other,
        }
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mode_code(mode: StructuredMode) -> u8 {
    match mode {
        StructuredMode::JsonSchema => 0,
        StructuredMode::JsonObject => 1,
        StructuredMode::Prompt => 2,
    }
}

fn step_down(mode: StructuredMode) -> Option<StructuredMode> {
    match mode {
        StructuredMode::JsonSchema => Some(StructuredMode::JsonObject),
        StructuredMode::JsonObject => Some(StructuredMode::Prompt),
        StructuredMode::Prompt => None,
    }
}

/// Runs share a provider fairly: a child run (`root/step/3`) counts as its root.
fn fair_key(caller: &str) -> String {
    caller.split('/').next().unwrap_or(caller).to_owned()
}

/// A rough count of a request's input tokens (4 characters a token).
fn input_estimate(request: &ChatRequest) -> u64 {
    let chars: usize = request.messages.iter().map(|m| m.content.as_deref().map_or(0, str::len) + 8).sum();
    (chars / 4 + 1) as u64
}

/// The chat-completions request body.
fn request_body(request: &ChatRequest, model: &str, mode: Option<StructuredMode>) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(request.messages.iter().map(message_json).collect()));
    body.insert("stream".into(), json!(false));
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    // Not `max_completion_tokens`: compatible servers ignore it.
    if let Some(n) = request.max_tokens {
        body.insert("max_tokens".into(), json!(n));
    }
    if let Some(seed) = request.seed {
        body.insert("seed".into(), json!(seed));
    }
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                }})
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let (Some(schema), Some(mode)) = (&request.answer_schema, mode) {
        match mode {
            StructuredMode::JsonSchema => {
                body.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {
                        "name": schema.name, "schema": schema.schema, "strict": false,
                    }}),
                );
            }
            StructuredMode::JsonObject => {
                body.insert("response_format".into(), json!({"type": "json_object", "schema": schema.schema}));
            }
            StructuredMode::Prompt => {}
        }
    }
    Value::Object(body)
}

fn message_json(message: &Message) -> Value {
    let role = match message.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    // Some servers refuse `content: null`: an assistant turn with tool
    // calls only sends an empty string.
    out.insert("content".into(), json!(message.content.clone().unwrap_or_default()));
    if !message.tool_calls.is_empty() {
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    Value::Object(out)
}

/// Reads a chat completion leniently; only a body with no usable choice is
/// malformed.
fn read_completion(
    body: &Value,
    model: &str,
    provider: &str,
    request: &ChatRequest,
    structured: Option<StructuredMode>,
    latency_ms: u64,
) -> Result<ChatResponse, LlmError> {
    let Some(choice) = body.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
        let what = if body.is_object() { "an object without choices" } else { "not an object" };
        return Err(LlmError::Malformed(format!("provider {provider}: the answer is {what}")));
    };
    let message = choice.get("message").unwrap_or(&Value::Null);
    let content = match message.get("content") {
        Some(Value::String(s)) => Some(s.clone()),
        // Content parts: keep the text ones.
        Some(Value::Array(parts)) => {
            Some(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(""))
        }
        _ => None,
    };
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for (i, call) in calls.iter().enumerate() {
            let function = call.get("function").unwrap_or(call);
            let Some(name) = function.get("name").and_then(Value::as_str) else { continue };
            let id = call.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{i}"), str::to_owned);
            tool_calls.push(ToolCall { id, name: name.to_owned(), arguments: arguments_text(function) });
        }
    } else if let Some(function) = message.get("function_call")
        && let Some(name) = function.get("name").and_then(Value::as_str)
    {
        // The legacy single function call.
        tool_calls.push(ToolCall {
            id: "call_0".to_owned(),
            name: name.to_owned(),
            arguments: arguments_text(function),
        });
    }
    let finish_reason = choice.get("finish_reason").and_then(Value::as_str).unwrap_or("unknown").to_owned();
    let usage = body.get("usage").filter(|u| u.is_object());
    let count = |keys: [&str; 2]| usage.and_then(|u| keys.iter().find_map(|k| u.get(*k).and_then(Value::as_u64)));
    let (usage, usage_estimated) =
        match (count(["prompt_tokens", "input_tokens"]), count(["completion_tokens", "output_tokens"])) {
            (Some(input_tokens), Some(output_tokens)) => (Usage { input_tokens, output_tokens }, false),
            _ => {
                let out = content.as_deref().map_or(0, str::len)
                    + tool_calls.iter().map(|c| c.arguments.len()).sum::<usize>();
                (Usage { input_tokens: input_estimate(request), output_tokens: (out / 4 + 1) as u64 }, true)
            }
        };
    Ok(ChatResponse {
        content,
        tool_calls,
        finish_reason,
        model: body.get("model").and_then(Value::as_str).unwrap_or(model).to_owned(),
        provider: provider.to_owned(),
        usage,
        usage_estimated,
        structured,
        latency_ms,
        system: String::new(),
        server: String::new(),
        request_model: model.to_owned(),
    })
}

fn arguments_text(function: &Value) -> String {
    match function.get("arguments") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "{}".to_owned(),
        // Some servers send the object itself.
        Some(other) => other.to_string(),
    }
}

/// A failed exchange, sorted. `Refused` is not worth another try.
enum Failure {
    Status { status: u16, retry_after: Option<Duration>, message: String },
    Transport { message: String },
    Refused { message: String },
    Other { message: String },
}

impl From<OpenAIError> for Failure {
    fn from(e: OpenAIError) -> Self {
        match e {
            OpenAIError::Boxed(boxed) => match boxed.downcast::<StatusError>() {
                Ok(status) => {
                    Failure::Status { status: status.status, retry_after: status.retry_after, message: status.message }
                }
                // Retrying cannot shrink an answer.
                Err(other) if other.is::<TooLarge>() => Failure::Refused { message: other.to_string() },
                Err(other) => Failure::Transport { message: other.to_string() },
            },
            OpenAIError::Reqwest(e) => {
                let e = e.without_url();
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                Failure::Transport { message }
            }
            OpenAIError::JSONDeserialize(e, _) => Failure::Other { message: format!("the answer is not JSON ({e})") },
            other => Failure::Other { message: other.to_string() },
        }
    }
}

impl Failure {
    /// Whether the server refused the `response_format` it was sent (some
    /// answer 400, llama-cpp-python answers 500 to every invalid request).
    fn refuses_response_format(&self) -> bool {
        match self {
            Failure::Status { status, message, .. } if (400..=599).contains(status) && *status != 429 => {
                let m = message.to_ascii_lowercase();
                m.contains("response_format") || m.contains("json_schema") || m.contains("json_object")
            }
            _ => false,
        }
    }

    fn into_error(self, provider: &str) -> LlmError {
        match self {
            Failure::Status { status, retry_after, message } => {
                let text = format!("provider {provider}: HTTP {status}: {message}");
                // A validation error is a 500 on some servers: retrying
                // cannot fix it.
                let invalid = message.to_ascii_lowercase().contains("validation error");
                if matches!(status, 408 | 409 | 429) || (status >= 500 && !invalid) {
                    LlmError::Unavailable { message: text, retry_after }
                } else {
                    LlmError::Rejected(text)
                }
            }
            Failure::Transport { message } => {
                LlmError::Unavailable { message: format!("provider {provider}: {message}"), retry_after: None }
            }
            Failure::Refused { message } => LlmError::Rejected(format!("provider {provider}: {message}")),
            Failure::Other { message } => LlmError::Malformed(format!("provider {provider}: {message}")),
        }
    }
}

/// A non-2xx answer, carried through async-openai as a boxed error.
#[derive(Debug)]
struct StatusError {
    status: u16,
    retry_after: Option<Duration>,
    message: String,
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for StatusError {}

#[derive(Debug)]
struct TooLarge;

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the answer exceeds {MAX_RESPONSE} bytes")
    }
}

impl std::error::Error for TooLarge {}

/// The HTTP exchange under async-openai: the project's reqwest client, a
/// bounded body, and failures that keep their status and `Retry-After`.
#[derive(Clone)]
struct Exchange {
    client: reqwest::Client,
}

impl tower::Service<HttpRequestFactory> for Exchange {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            let request = factory.build().await?;
            let mut response = client.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(OpenAIError::Reqwest)? {
                if body.len() + chunk.len() > MAX_RESPONSE {
                    return Err(OpenAIError::Boxed(Box::new(TooLarge)));
                }
                body.extend_from_slice(&chunk);
            }
            if !status.is_success() {
                let retry_after = headers.get(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(v.to_str().ok()?));
                return Err(OpenAIError::Boxed(Box::new(StatusError {
                    status: status.as_u16(),
                    retry_after,
                    message: error_text(&body),
                })));
            }
            let mut rebuilt = http::Response::new(body);
            *rebuilt.status_mut() = status;
            *rebuilt.headers_mut() = headers;
            Ok(reqwest::Response::from(rebuilt))
        })
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// The server's error message (OpenAI's `{"error": {"message"}}` when it
/// is that), cut short.
fn error_text(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.pointer("/error/message").or_else(|| v.get("error")).or_else(|| v.get("message")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.trim();
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_owned();
    }
    let mut cut = MAX_ERROR_TEXT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

const MINUTE: Duration = Duration::from_secs(60);

/// Requests of the last minute, for the per-minute limits.
#[derive(Default)]
struct Window {
    /// In slot order (slots only grow).
    entries: VecDeque<Entry>,
    next_slot: u64,
    /// The sum of the entries' tokens.
    tokens: u64,
}

struct Entry {
    slot: u64,
    at: Instant,
    tokens: u64,
}

impl Window {
    fn expire(&mut self, now: Instant) {
        while let Some(e) = self.entries.front().filter(|e| e.at + MINUTE <= now) {
            self.tokens -= e.tokens;
            self.entries.pop_front();
        }
    }

    fn push(&mut self, at: Instant, tokens: u64) -> u64 {
        self.next_slot += 1;
        self.tokens += tokens;
        self.entries.push_back(Entry { slot: self.next_slot, at, tokens });
        self.next_slot
    }

    /// Replaces the tokens of `slot`, if it is still in the window.
    fn settle(&mut self, slot: u64, tokens: u64) {
        if let Ok(i) = self.entries.binary_search_by_key(&slot, |e| e.slot) {
            let entry = &mut self.entries[i];
            self.tokens = self.tokens - entry.tokens + tokens;
            entry.tokens = tokens;
        }
    }
}

/// A concurrency limit that hands free places out round-robin over the
/// runs waiting, so one run with a hundred calls queued cannot starve
/// another with one.
struct Gate {
    limit: Option<usize>,
    state: Arc<Mutex<GateState>>,
}

#[derive(Default)]
struct GateState {
    in_flight: usize,
    /// Waiters by run, and the order in which runs are served (each run
    /// with waiters appears once).
    waiting: BTreeMap<String, VecDeque<oneshot::Sender<Permit>>>,
    turns: VecDeque<String>,
}

/// A place taken at a [`Gate`], given back on drop (also when it is
/// dropped unreceived, by a waiter that gave up).
struct Permit {
    state: Option<Arc<Mutex<GateState>>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let mut guard = state.lock().expect("gate");
            pass_on(&state, &mut guard);
        }
    }
}

/// Hands the place just freed to the next run's oldest live waiter, or
/// frees it.
fn pass_on(arc: &Arc<Mutex<GateState>>, state: &mut GateState) {
    while let Some(key) = state.turns.pop_front() {
        let Some(queue) = state.waiting.get_mut(&key) else { continue };
        while let Some(waiter) = queue.pop_front() {
            match waiter.send(Permit { state: Some(Arc::clone(arc)) }) {
                Ok(()) => {
                    if queue.is_empty() {
                        state.waiting.remove(&key);
                    } else {
                        state.turns.push_back(key);
                    }
                    return;
                }
                // The waiter gave up: this permit must not pass on again.
                Err(mut unsent) => unsent.state = None,
            }
        }
        state.waiting.remove(&key);
    }
    state.in_flight -= 1;
}

impl Gate {
    fn new(limit: Option<usize>) -> Self {
        Self { limit, state: Arc::default() }
    }

    async fn acquire(&self, key: String) -> Permit {
        let Some(limit) = self.limit else {
            return Permit { state: None };
        };
        let waiter = {
            let mut state = self.state.lock().expect("gate");
            if state.in_flight < limit && state.waiting.is_empty() {
                state.in_flight += 1;
                return Permit { state: Some(Arc::clone(&self.state)) };
            }
            let (tx, rx) = oneshot::channel();
            let queue = state.waiting.entry(key.clone()).or_default();
            let first = queue.is_empty();
            queue.push_back(tx);
            if first {
                state.turns.push_back(key);
            }
            rx
        };
        // Senders live in the gate, which outlives every request.
        waiter.await.unwrap_or(Permit { state: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_serves_waiting_runs_in_turn() {
        let gate = Arc::new(Gate::new(Some(1)));
        let first = gate.acquire("a".into()).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Run a queues three calls, then run b one.
        for (i, key) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let (queued, order) = (Arc::clone(&gate), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let permit = queued.acquire(key.into()).await;
                order.lock().unwrap().push(format!("{key}{i}"));
                drop(permit);
            }));
            // Let each reach the queue before the next.
            while gate.state.lock().unwrap().waiting.values().map(VecDeque::len).sum::<usize>() <= i {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a0", "b3", "a1", "a2"]);
        assert_eq!(gate.state.lock().unwrap().in_flight, 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_place_on() {
        let gate = Gate::new(Some(1));
        let held = gate.acquire("a".into()).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(1), gate.acquire("b".into())).await;
        assert!(gave_up.is_err());
        drop(held);
        // The place is free again, not lost with the waiter.
        let _again = gate.acquire("c".into()).await;
        assert_eq!(gate.state.lock().unwrap().in_flight, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn per_minute_limits_queue_requests() {
        let config = ProviderConfig {
            name: "p".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: ApiKey::default(),
            default_model: "m".into(),
            limits: Limits { max_concurrent: None, requests_per_minute: Some(2), tokens_per_minute: Some(1000) },
            system: "openai".to_owned(),
        };
        crate::install_crypto_provider();
        let provider = Provider::new(reqwest::Client::new(), config);
        let start = Instant::now();
        provider.admit(10).await;
        provider.admit(10).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // The third request of the minute waits for the first to age out.
        provider.admit(10).await;
        assert_eq!(start.elapsed(), MINUTE);
        // Tokens: 990 more do not fit beside the two of the last minute.
        let slot = provider.admit(900).await;
        assert_eq!(start.elapsed(), MINUTE);
        provider.settle(slot, 20);
        provider.admit(900).await;
        assert_eq!(start.elapsed(), MINUTE * 2);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("-1"), None);
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn env_provider_checks_values_without_quoting_the_key() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let p =
            ProviderConfig::from_env(env(&[("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"), ("OPENAI_API_KEY", "sk-1")]))
                .unwrap();
        assert_eq!((p.base_url.as_str(), p.default_model.as_str()), ("http://127.0.0.1:9/v1", "gpt-4o-mini"));
        assert!(!format!("{p:?}").contains("sk-1"));
        let e = ProviderConfig::from_env(env(&[("OPENAI_API_KEY", "sk-\nsecret")])).unwrap_err();
        assert!(e.contains("OPENAI_API_KEY") && !e.contains("secret"), "{e}");
        assert!(ProviderConfig::from_env(env(&[("SWITCHYARD_LLM_MAX_CONCURRENT", "0")])).is_err());
        assert!(ProviderConfig::from_env(env(&[("OPENAI_BASE_URL", "file:///etc")])).is_err());
    }

    #[test]
    fn completions_are_read_leniently() {
        let request = ChatRequest {
            provider: None,
            model: None,
            messages: vec![Message::user("hi")],
            tools: vec![],
            answer_schema: None,
            temperature: None,
            max_tokens: None,
            seed: None,
            timeout: Duration::from_secs(1),
            caller: String::new(),
            idempotency_key: String::new(),
            traceparent: None,
        };
        // No `object`, an unknown finish reason, null content with calls, no usage.
        let body = json!({"choices": [{"message": {"content": null, "tool_calls": [
            {"function": {"name": "lookup", "arguments": {"q": 1}}}
        ]}, "finish_reason": "eos_token"}], "service_tier": "weird"});
        let r = read_completion(&body, "m", "default", &request, None, 3).unwrap();
        assert_eq!((r.finish_reason.as_str(), r.model.as_str()), ("eos_token", "m"));
        assert_eq!(
            r.tool_calls,
            vec![ToolCall { id: "call_0".into(), name: "lookup".into(), arguments: r#"{"q":1}"#.into() }]
        );
        assert!(r.usage_estimated && r.content.is_none());
        assert!(matches!(
            read_completion(&json!({"error": "x"}), "m", "p", &request, None, 0),
            Err(LlmError::Malformed(_))
        ));
    }
}
