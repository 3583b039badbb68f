//! What the model-calling kinds (`llm`, `decide`, `agent`) share: one
//! journaled, retried, budgeted model call, and lenient reading of JSON
//! answers.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::llm::{CALL_OP, CallOutcome, ChatRequest, ChatResponse, LanguageModel, LlmError, Message, Usage};
use crate::{StepContext, StepError, StepResult};

/// Model calls tried per call before the step fails (retryable, so the
/// step's own `retry` policy may start it over).
pub(crate) const CALL_ATTEMPTS: u32 = 5;

/// Longest wait a server's `Retry-After` can impose on one call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Default request timeout of a model call.
pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(120)
}

pub(crate) fn default_repairs() -> u32 {
    2
}

/// Most re-asks a step may configure.
pub(crate) const MAX_REPAIRS: u32 = 10;

/// Longest answer quoted in an error message.
const QUOTE: usize = 500;

/// What a step's model calls added up to; part of its output.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Calls {
    pub calls: u32,
    pub usage: Usage,
    pub latency_ms: u64,
    pub model: String,
}

impl Calls {
    fn add(&mut self, response: &ChatResponse) {
        self.calls += 1;
        self.usage.input_tokens = self.usage.input_tokens.saturating_add(response.usage.input_tokens);
        self.usage.output_tokens = self.usage.output_tokens.saturating_add(response.usage.output_tokens);
        self.latency_ms = self.latency_ms.saturating_add(response.latency_ms);
        self.model = response.model.clone();
    }
}

/// One model call, journaled: a replay returns the recorded answer instead
/// of asking again. A temporary failure (429, 5xx, timeout) is journaled
/// too, then waited out with a durable sleep (at least the server's
/// `Retry-After`, else 1 s doubling to 60 s) and tried again, up to
/// [`CALL_ATTEMPTS`]. A new call first checks the run's token budget.
pub(crate) async fn call(
    ctx: &mut StepContext,
    model: &Arc<dyn LanguageModel>,
    request: &ChatRequest,
    calls: &mut Calls,
) -> StepResult<ChatResponse> {
    let mut failures = 0u32;
    loop {
        let replayed = ctx.will_replay();
        if !replayed {
            ctx.tokens().check()?;
        }
        let model = Arc::clone(model);
        let mut request = request.clone();
        request.caller = ctx.run_id().to_owned();
        request.traceparent = ctx.traceparent();
        let outcome = ctx
            .journaled_keyed(CALL_OP, |key| async move {
                request.idempotency_key = key;
                match model.chat(request).await {
                    Ok(response) => Ok(CallOutcome::Answered(response)),
                    Err(LlmError::Unavailable { message, retry_after }) => Ok(CallOutcome::Unavailable {
                        message,
                        retry_after_ms: retry_after.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
                    }),
                    Err(LlmError::Malformed(message)) => Ok(CallOutcome::Unavailable { message, retry_after_ms: None }),
                    Err(LlmError::UnknownProvider(name)) => Err(StepError::fatal(
                        "llm_provider",
                        format!("no model provider {name:?} is configured (see README: Model providers)"),
                    )
                    .into()),
                    Err(LlmError::Rejected(message)) => Err(StepError::fatal("llm_rejected", message).into()),
                }
            })
            .await?;
        match outcome {
            CallOutcome::Answered(response) => {
                if !replayed {
                    ctx.tokens().add(response.usage.total());
                }
                calls.add(&response);
                return Ok(response);
            }
            CallOutcome::Unavailable { message, retry_after_ms } => {
                failures += 1;
                if failures >= CALL_ATTEMPTS {
                    return Err(StepError::retryable(
                        "llm_unavailable",
                        format!("{message} (gave up after {failures} attempts)"),
                    )
                    .into());
                }
                let backoff = Duration::from_secs(1u64 << (failures - 1).min(6)).min(Duration::from_secs(60));
                let asked = retry_after_ms.map(Duration::from_millis).unwrap_or_default().min(MAX_RETRY_AFTER);
                ctx.sleep(backoff.max(asked)).await?;
            }
        }
    }
}

/// Reads a JSON answer leniently: surrounding whitespace, a Markdown code
/// fence, or prose around one object or array are tolerated.
pub(crate) fn parse_json(content: &str) -> Result<Value, String> {
    let text = content.trim();
    let text = strip_fence(text);
    if let Ok(value) = serde_json::from_str(text) {
        return Ok(value);
    }
    for (open, close) in [('{', '}'), ('[', ']')] {
        if let (Some(start), Some(end)) = (text.find(open), text.rfind(close))
            && start < end
            && let Ok(value) = serde_json::from_str(&text[start..=end])
        {
            return Ok(value);
        }
    }
    Err(match serde_json::from_str::<Value>(text) {
        Err(e) => format!("the answer is not JSON ({e})"),
        Ok(_) => "the answer is not JSON".to_owned(),
    })
}

fn strip_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    // Drop the info string (```json).
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

/// The validation errors of `value` against `schema`, as one line each
/// (at most five), or `None` if it is valid.
pub(crate) fn schema_errors(validator: &jsonschema::Validator, value: &Value) -> Option<String> {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() { e.to_string() } else { format!("at {at}: {e}") }
        })
        .collect();
    if errors.is_empty() { None } else { Some(errors.join("; ")) }
}

/// The validator of the schema at `with.{field}`, if there is one.
pub(crate) fn validator(schema: Option<&Value>, field: &str) -> StepResult<Option<jsonschema::Validator>> {
    schema
        .map(|schema| {
            jsonschema::validator_for(schema)
                .map_err(|e| StepError::fatal("config", format!("with.{field}: invalid JSON Schema: {e}")).into())
        })
        .transpose()
}

/// A JSON answer that matches `validator`, or what is wrong with it (for
/// the re-ask and the final error).
pub(crate) fn checked_json(validator: &jsonschema::Validator, content: &str) -> Result<Value, String> {
    let value = parse_json(content)?;
    match schema_errors(validator, &value) {
        None => Ok(value),
        Some(errors) => Err(format!("it does not match the schema: {errors}")),
    }
}

/// The re-ask after an answer that `checked_json` refused.
pub(crate) fn repair(problem: &str) -> Message {
    Message::user(format!("That answer is not valid: {problem}. Answer again with only the corrected JSON."))
}

/// The opening turns: the system message (the step's own, then, with an
/// output schema, how to answer: `{lead} with only a JSON value that
/// follows this JSON Schema`), if any, and the prompt.
pub(crate) fn opening(system: Option<&str>, schema: Option<&Value>, lead: &str, prompt: &str) -> Vec<Message> {
    let mut text = system.unwrap_or_default().to_owned();
    if let Some(schema) = schema {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&format!("{lead} with only a JSON value that follows this JSON Schema:\n{schema}"));
    }
    let mut messages = Vec::with_capacity(2);
    if !text.is_empty() {
        messages.push(Message::system(text));
    }
    messages.push(Message::user(prompt));
    messages
}

/// `text` cut to [`QUOTE`] bytes for an error message.
pub(crate) fn quote(text: &str) -> String {
    if text.len() <= QUOTE {
        return format!("{text:?}");
    }
    let mut cut = QUOTE;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}…", &text[..cut])
}

/// A model request with the options every model kind has.
pub(crate) struct Options {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<i64>,
    pub timeout: Duration,
}

impl Options {
    pub fn request(&self, messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            provider: self.provider.clone(),
            model: self.model.clone(),
            messages,
            tools: Vec::new(),
            answer_schema: None,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            seed: self.seed,
            timeout: self.timeout,
            caller: String::new(),
            idempotency_key: String::new(),
            traceparent: None,
        }
    }
}

/// Checks the options every model kind has, at compile time.
pub(crate) fn check_options(
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    max_repairs: u32,
    issues: &mut Vec<crate::ConfigIssue>,
) {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        issues.push(crate::ConfigIssue::new("temperature", "must be between 0 and 2"));
    }
    if max_tokens == Some(0) {
        issues.push(crate::ConfigIssue::new("max_tokens", "must be at least 1"));
    }
    if max_repairs > MAX_REPAIRS {
        issues.push(crate::ConfigIssue::new("max_repairs", format!("must be at most {MAX_REPAIRS}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fenced_and_wrapped_json() {
        assert_eq!(parse_json(" {\"a\":1} ").unwrap()["a"], 1);
        assert_eq!(parse_json("```json\n{\"a\":2}\n```").unwrap()["a"], 2);
        assert_eq!(parse_json("Sure! Here it is: {\"a\":3} Hope that helps.").unwrap()["a"], 3);
        assert!(parse_json("no json here").unwrap_err().contains("not JSON"));
        assert!(parse_json("```json\n{\"a\":").is_err());
    }

    #[test]
    fn quotes_are_bounded() {
        let long = "é".repeat(1000);
        assert!(quote(&long).len() < 520);
    }
}
