//! The language-model port used by the `llm`, `decide` and `agent` steps.
//! The OpenAI-compatible adapter (async-openai) lives in
//! `switchyard-integrations`; it owns base URLs, API keys and provider limits,
//! so a step names a provider and never sees a credential.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Calls the assistant asked for (assistant messages only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: Role::System, content: Some(content.into()), tool_calls: Vec::new(), tool_call_id: None }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: Role::User, content: Some(content.into()), tool_calls: Vec::new(), tool_call_id: None }
    }
    /// The assistant's turn as it answered (content and tool calls).
    pub fn assistant(response: &ChatResponse) -> Self {
        Self {
            role: Role::Assistant,
            content: response.content.clone(),
            tool_calls: response.tool_calls.clone(),
            tool_call_id: None,
        }
    }
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// A call the model asked for. `arguments` is the JSON text as the model
/// wrote it (it may not parse).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A JSON Schema the answer must follow (structured output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerSchema {
    /// `[A-Za-z0-9_-]{1,64}`, as OpenAI requires.
    pub name: String,
    pub schema: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The provider's name; `None` is `default`.
    pub provider: Option<String>,
    /// `None`: the provider's default model.
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub answer_schema: Option<AnswerSchema>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<i64>,
    /// The whole request, queueing for a provider limit excluded.
    pub timeout: Duration,
    /// Who is asking (`{run}/{step}`): limits queue fairly by run.
    pub caller: String,
    /// Sent as `Idempotency-Key` (stable across a crash and a replay).
    pub idempotency_key: String,
    /// The W3C `traceparent` to send, when the run is traced.
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// How a provider was asked for structured output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredMode {
    /// `response_format: {type: json_schema, json_schema: {...}}`.
    JsonSchema,
    /// `response_format: {type: json_object, schema: ...}` (llama.cpp and others).
    JsonObject,
    /// The schema in the prompt only.
    Prompt,
}

/// A model's answer, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: String,
    pub model: String,
    /// The provider's name.
    pub provider: String,
    pub usage: Usage,
    /// The server sent no usage: `usage` is an estimate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
    /// How structured output was asked for, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<StructuredMode>,
    /// Time on the wire (queueing for limits excluded).
    pub latency_ms: u64,
    /// What kind of server the provider is (`openai`, `ollama`, `vllm`):
    /// telemetry's `gen_ai.provider.name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system: String,
    /// The server's `host:port`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server: String,
    /// The model asked for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_model: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// No provider of that name is configured.
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),
    /// The request is wrong (4xx other than 408/409/429): retrying cannot help.
    #[error("{0}")]
    Rejected(String),
    /// 429 or 5xx, a refused connection, a timeout: worth another try,
    /// not before `retry_after` if the server said.
    #[error("{message}")]
    Unavailable { message: String, retry_after: Option<Duration> },
    /// The answer is not a chat completion.
    #[error("{0}")]
    Malformed(String),
}

#[async_trait]
pub trait LanguageModel: Send + Sync {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError>;
}

/// A port with no provider at all: for engines that make no model calls
/// (the benchmark's plain workloads, unit tests).
pub struct NoModels;

#[async_trait]
impl LanguageModel for NoModels {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        Err(LlmError::UnknownProvider(request.provider.unwrap_or_else(|| "default".to_owned())))
    }
}

/// The journaled operation name of a model call (its value is a
/// [`CallOutcome`]). The engine adds up the tokens of these to enforce a
/// run's `limits.llm_tokens`, and reports show them.
pub const CALL_OP: &str = "llm_call";

/// What one model call came to, as journaled: an answer, or a failure the
/// step waits out and retries (so a replay neither asks again nor forgets
/// the wait).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CallOutcome {
    Answered(ChatResponse),
    Unavailable {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// The usage of a journaled op that is an answered model call (read from
/// the JSON as journaled, without decoding the whole answer); `None` for
/// any other op, and for a call that failed.
pub fn usage_of_op(name: &str, value: &Value) -> Option<Usage> {
    if name != CALL_OP || value.get("outcome").and_then(Value::as_str) != Some("answered") {
        return None;
    }
    let usage = &value["usage"];
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage { input_tokens: n("input_tokens"), output_tokens: n("output_tokens") })
}

/// The tokens a journaled op used, if it is a model call.
pub fn tokens_of_op(name: &str, value: &Value) -> u64 {
    usage_of_op(name, value).map_or(0, |u| u.total())
}
