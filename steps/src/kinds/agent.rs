use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::model::{self, Calls, Options};
use crate::http::{HttpBody, HttpClient, HttpRequest};
use crate::llm::{LanguageModel, Message, ToolCall, ToolSpec};
use crate::{ConfigIssue, Step, StepContext, StepError, StepResult, Stop};

/// `agent`: a tool-calling loop. The model answers or asks for tool calls;
/// each call's arguments are checked against the tool's JSON Schema (an
/// invalid call goes back to the model as a tool error), the calls of one
/// turn run concurrently, and their results go back to the model, until it
/// answers without calls. `max_turns` and `max_tokens` bound the loop; an
/// `output_schema` validates the final answer like `llm`.
///
/// Tools are an `http` call (the arguments are the JSON body, or the query
/// of a GET/DELETE; `Idempotency-Key: {run}/{step}/tool/{n}`) or a child
/// `workflow` (run as child run `{run}/{step}/tool/{n}`, its input the
/// arguments, its output the result). Every model answer and every tool
/// result is journaled before the loop goes on, so a restarted step neither
/// asks nor calls again what it already did.
pub struct Agent {
    model: Arc<dyn LanguageModel>,
    http: Arc<dyn HttpClient>,
}

impl Agent {
    pub fn new(model: Arc<dyn LanguageModel>, http: Arc<dyn HttpClient>) -> Self {
        Self { model, http }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    pub tools: Vec<ToolConfig>,
    #[serde(default = "default_turns")]
    pub max_turns: u32,
    /// Model tokens (input and output, over all turns) the loop may use.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub output_schema: Option<Value>,
    #[serde(default = "model::default_repairs")]
    pub max_repairs: u32,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    /// Per model call.
    #[serde(default = "model::default_timeout", deserialize_with = "crate::duration::de")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments; a workflow tool defaults to the
    /// workflow's `input` schema (the compiler fills it in).
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub http: Option<HttpTool>,
    /// A workflow file, relative to this one (the engine runs it).
    #[serde(default)]
    pub workflow: Option<String>,
    /// Arguments fixed by the workflow's author (a URL, a team): merged
    /// over the model's, and left out of the schema the model is shown,
    /// so the model neither sees nor overrides them.
    #[serde(default)]
    pub bind: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_tool_timeout", deserialize_with = "crate::duration::de")]
    pub timeout: Duration,
}

fn default_turns() -> u32 {
    10
}

fn default_method() -> String {
    "POST".to_owned()
}

fn default_tool_timeout() -> Duration {
    Duration::from_secs(30)
}

const MAX_TURNS: u32 = 100;
const MAX_TOOLS: usize = 64;
/// Most tool calls run in one turn; the model is told the rest were not.
const MAX_CALLS_PER_TURN: usize = 16;
/// Longest tool result handed back to the model.
const MAX_RESULT: usize = 64 * 1024;

fn tool_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// One tool call as journaled: what was asked and what came of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ToolOutcome {
    tool: String,
    call_id: String,
    ok: bool,
    /// The result (ok) or the error text (not ok) the model is shown.
    result: Value,
}

impl Step for Agent {
    const KIND: &'static str = "agent";
    type Config = AgentConfig;
    type Output = Value;

    fn check(config: &AgentConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if config.tools.is_empty() {
            issues.push(ConfigIssue::new("tools", "needs at least one tool (an `llm` step needs none)"));
        }
        if config.tools.len() > MAX_TOOLS {
            issues.push(ConfigIssue::new("tools", format!("at most {MAX_TOOLS} tools")));
        }
        let mut names = BTreeSet::new();
        for (i, tool) in config.tools.iter().enumerate() {
            let at = |field: &str| format!("tools[{i}].{field}");
            if !tool_name_ok(&tool.name) {
                issues.push(ConfigIssue::new(at("name"), "1 to 64 letters, digits, `_` or `-`"));
            } else if !names.insert(tool.name.as_str()) {
                issues.push(ConfigIssue::new(at("name"), format!("a second tool named {:?}", tool.name)));
            }
            match (&tool.http, &tool.workflow) {
                (Some(_), Some(_)) | (None, None) => {
                    issues.push(ConfigIssue::new(format!("tools[{i}]"), "set one of `http` or `workflow`"))
                }
                _ => {}
            }
            if let Some(schema) = &tool.parameters
                && let Err(e) = jsonschema::validator_for(schema)
            {
                issues.push(ConfigIssue::new(at("parameters"), format!("invalid JSON Schema: {e}")));
            }
            if let Some(http) = &tool.http
                && !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&http.method.to_ascii_uppercase().as_str())
            {
                issues.push(ConfigIssue::new(at("http.method"), "one of GET, POST, PUT, PATCH, DELETE"));
            }
        }
        if !(1..=MAX_TURNS).contains(&config.max_turns) {
            issues.push(ConfigIssue::new("max_turns", format!("between 1 and {MAX_TURNS}")));
        }
        if config.max_tokens == Some(0) {
            issues.push(ConfigIssue::new("max_tokens", "must be at least 1"));
        }
        if let Some(schema) = &config.output_schema
            && let Err(e) = jsonschema::validator_for(schema)
        {
            issues.push(ConfigIssue::new("output_schema", format!("invalid JSON Schema: {e}")));
        }
        model::check_options(config.temperature, None, config.max_repairs, &mut issues);
        issues
    }

    async fn run(&self, config: AgentConfig, ctx: &mut StepContext) -> StepResult {
        let fatal = |e: String| Stop::Error(StepError::fatal("config", e));
        let mut tools = BTreeMap::new();
        let mut specs = Vec::new();
        for tool in &config.tools {
            let parameters = unbound(tool.parameters.clone().unwrap_or_else(|| json!({"type": "object"})), &tool.bind);
            let validator = jsonschema::validator_for(&parameters)
                .map_err(|e| fatal(format!("with.tools: {}: invalid JSON Schema: {e}", tool.name)))?;
            specs.push(ToolSpec { name: tool.name.clone(), description: tool.description.clone(), parameters });
            tools.insert(tool.name.clone(), (tool.clone(), Arc::new(validator)));
        }
        let output = model::validator(config.output_schema.as_ref(), "output_schema")?;
        let options = Options {
            provider: config.provider.clone(),
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: None,
            seed: config.seed,
            timeout: config.timeout,
        };
        let messages = model::opening(
            config.system.as_deref(),
            config.output_schema.as_ref(),
            "When you are done, answer",
            &config.prompt,
        );
        let mut request = options.request(messages);
        request.tools = specs;

        let mut calls = Calls::default();
        let mut tool_calls = 0u32;
        let mut repairs = 0u32;
        let mut last_answer = String::new();
        for turn in 1..=config.max_turns {
            if let Some(max) = config.max_tokens
                && calls.usage.total() >= max
            {
                return Err(StepError::fatal(
                    "agent_max_tokens",
                    format!(
                        "the agent used {} model tokens in {} turns, its max_tokens is {max}",
                        calls.usage.total(),
                        turn - 1
                    ),
                )
                .into());
            }
            let response = model::call(ctx, &self.model, &request, &mut calls).await?;
            request.messages.push(Message::assistant(&response));
            if response.tool_calls.is_empty() {
                let content = response.content.clone().unwrap_or_default();
                last_answer = content.clone();
                let Some(validator) = &output else {
                    return Ok(done("text", Value::String(content), turn, tool_calls, &calls));
                };
                let problem = match model::checked_json(validator, &content) {
                    Ok(value) => return Ok(done("json", value, turn, tool_calls, &calls)),
                    Err(problem) => problem,
                };
                if repairs >= config.max_repairs.min(model::MAX_REPAIRS) {
                    return Err(StepError::fatal(
                        "invalid_output",
                        format!("the agent's final answer {} is not valid: {problem}", model::quote(&content)),
                    )
                    .into());
                }
                repairs += 1;
                request.messages.push(model::repair(&problem));
                continue;
            }
            let outcomes = self.call_tools(ctx, &tools, &response.tool_calls, tool_calls).await?;
            tool_calls += response.tool_calls.len() as u32;
            for outcome in outcomes {
                request.messages.push(Message::tool(outcome.call_id.clone(), result_text(&outcome)));
            }
        }
        Err(StepError::fatal(
            "agent_max_turns",
            format!(
                "the agent did not finish within max_turns ({}); it made {tool_calls} tool calls{}",
                config.max_turns,
                if last_answer.is_empty() {
                    String::new()
                } else {
                    format!(", its last answer {}", model::quote(&last_answer))
                }
            ),
        )
        .into())
    }
}

impl Agent {
    /// Runs one turn's tool calls, concurrently, and journals each result in
    /// call order. Results already journaled (a prefix, after a crash or a
    /// wait) are replayed, not called again.
    async fn call_tools(
        &self,
        ctx: &mut StepContext,
        tools: &BTreeMap<String, (ToolConfig, Arc<jsonschema::Validator>)>,
        asked: &[ToolCall],
        first: u32,
    ) -> StepResult<Vec<ToolOutcome>> {
        let mut outcomes = Vec::with_capacity(asked.len());
        while outcomes.len() < asked.len() && ctx.will_replay() {
            let outcome: ToolOutcome = ctx.journaled(TOOL_OP, std::future::pending()).await?;
            outcomes.push(outcome);
        }
        let start = outcomes.len();
        if start < asked.len() {
            // The answer that asked for these calls is durable before they run.
            ctx.commit_ops().await?;
        }
        let base_key = ctx.idempotency_key().to_owned();
        let traceparent = ctx.traceparent();
        let workflows = ctx.workflows().cloned();
        let cancel = ctx.cancel_token();
        let pending = asked[start..].iter().enumerate().map(|(k, call)| {
            let n = first + (start + k) as u32;
            let key = format!("{base_key}/tool/{n}");
            let too_many = start + k >= MAX_CALLS_PER_TURN;
            let tool = tools.get(&call.name).cloned();
            let known: Vec<&str> = tools.keys().map(String::as_str).collect();
            let unknown = format!("unknown tool {:?}; the tools are: {}", call.name, known.join(", "));
            let (http, workflows, cancel) = (Arc::clone(&self.http), workflows.clone(), cancel.clone());
            let traceparent = traceparent.clone();
            async move {
                if too_many {
                    return Ok(Err(format!("not run: at most {MAX_CALLS_PER_TURN} tool calls are run in one turn")));
                }
                let Some((tool, validator)) = tool else {
                    return Ok(Err(unknown));
                };
                let args = match model::parse_json(&call.arguments) {
                    Ok(args) => args,
                    Err(e) => return Ok(Err(format!("the arguments are not valid JSON: {e}"))),
                };
                if let Some(errors) = model::schema_errors(&validator, &args) {
                    return Ok(Err(format!("invalid arguments: {errors}")));
                }
                let args = match args {
                    Value::Object(mut map) => {
                        map.extend(tool.bind.clone());
                        Value::Object(map)
                    }
                    other if tool.bind.is_empty() => other,
                    _ => return Ok(Err("the arguments must be an object".to_owned())),
                };
                match (&tool.http, &tool.workflow) {
                    (Some(h), _) => Ok(http_tool(&*http, h, args, &key, traceparent.as_deref()).await),
                    (None, Some(_)) => {
                        let Some(workflows) = workflows else {
                            return Err(Stop::Error(StepError::fatal("engine", "workflow tools need the engine")));
                        };
                        match workflows.run(&tool.name, &key, args, cancel).await {
                            Ok(output) => Ok(Ok(output)),
                            // The child failed: the model is told, and may try otherwise.
                            Err(Stop::Error(e)) if !e.retryable => Ok(Err(format!("{}: {}", e.code, e.message))),
                            Err(stop) => Err(stop),
                        }
                    }
                    (None, None) => Ok(Err("the tool has nothing to call".to_owned())),
                }
            }
        });
        let results = futures::future::join_all(pending).await;
        for (k, result) in results.into_iter().enumerate() {
            let call = &asked[start + k];
            // Journal the results in call order, up to the first that did
            // not end (a waiting child, an engine error): the later ones
            // run again when the step is called again.
            let result = match result {
                Ok(r) => r,
                Err(stop) => return Err(stop),
            };
            let outcome = match result {
                Ok(value) => ToolOutcome { tool: call.name.clone(), call_id: call.id.clone(), ok: true, result: value },
                Err(error) => ToolOutcome {
                    tool: call.name.clone(),
                    call_id: call.id.clone(),
                    ok: false,
                    result: Value::String(error),
                },
            };
            let outcome = ctx.journaled(TOOL_OP, async move { Ok(outcome) }).await?;
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// `schema` without the properties that `bind` fixes.
fn unbound(mut schema: Value, bind: &Map<String, Value>) -> Value {
    if bind.is_empty() {
        return schema;
    }
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.retain(|k, _| !bind.contains_key(k));
    }
    if let Some(required) = schema.get_mut("required").and_then(Value::as_array_mut) {
        required.retain(|k| k.as_str().is_none_or(|k| !bind.contains_key(k)));
    }
    schema
}

/// The journaled operation name of a tool call.
const TOOL_OP: &str = "tool_call";

async fn http_tool(
    http: &dyn HttpClient,
    tool: &HttpTool,
    args: Value,
    key: &str,
    traceparent: Option<&str>,
) -> Result<Value, String> {
    let method = tool.method.to_ascii_uppercase();
    let mut headers: Vec<(String, String)> = tool.headers.clone().into_iter().collect();
    headers.push(("Idempotency-Key".to_owned(), key.to_owned()));
    if let Some(tp) = traceparent
        && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
    {
        headers.push(("traceparent".to_owned(), tp.to_owned()));
    }
    let (query, body) = if matches!(method.as_str(), "GET" | "DELETE") {
        let query = match args {
            Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
            _ => Vec::new(),
        };
        (query, None)
    } else {
        (Vec::new(), Some(HttpBody::Json(args)))
    };
    let request = HttpRequest { method, url: tool.url.clone(), headers, query, body, timeout: tool.timeout };
    let response = http.send(request).await.map_err(|e| format!("the call failed: {e}"))?;
    let text = String::from_utf8_lossy(&response.body).into_owned();
    let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
    if (200..300).contains(&response.status) {
        Ok(body)
    } else {
        let shown = match &body {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Err(format!("HTTP {}: {}", response.status, cut(&shown, 1000)))
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

/// What the model is shown for a tool call.
fn result_text(outcome: &ToolOutcome) -> String {
    let text = match (&outcome.result, outcome.ok) {
        (Value::String(s), true) => s.clone(),
        (other, true) => other.to_string(),
        (Value::String(s), false) => format!("error: {s}"),
        (other, false) => format!("error: {other}"),
    };
    cut(&text, MAX_RESULT)
}

fn done(key: &str, value: Value, turns: u32, tool_calls: u32, calls: &Calls) -> Value {
    let mut out = Map::new();
    out.insert(key.to_owned(), value);
    out.insert("turns".into(), json!(turns));
    out.insert("tool_calls".into(), json!(tool_calls));
    out.insert("model".into(), json!(calls.model));
    out.insert("usage".into(), json!(calls.usage));
    out.insert("calls".into(), json!(calls.calls));
    out.insert("latency_ms".into(), json!(calls.latency_ms));
    Value::Object(out)
}
