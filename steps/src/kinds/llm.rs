use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{self, Calls, Options};
use crate::llm::{AnswerSchema, LanguageModel, Message};
use crate::{ConfigIssue, Step, StepContext, StepError, StepResult};

/// `llm`: one answer from a model. With `output_schema` the answer is asked
/// for as structured output (where the server supports it) and always
/// validated here; an invalid answer is re-asked with the validation error,
/// at most `max_repairs` times, then the step fails quoting the last answer.
/// Output: `text` (or `json` with a schema), `model`, `finish_reason`,
/// `usage {input_tokens, output_tokens}`, `latency_ms`, `calls`.
pub struct Llm {
    model: Arc<dyn LanguageModel>,
}

impl Llm {
    pub fn new(model: Arc<dyn LanguageModel>) -> Self {
        Self { model }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
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
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default = "model::default_timeout", deserialize_with = "crate::duration::de")]
    pub timeout: Duration,
}

impl Step for Llm {
    const KIND: &'static str = "llm";
    type Config = LlmConfig;
    type Output = Value;

    fn check(config: &LlmConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if let Some(schema) = &config.output_schema
            && let Err(e) = jsonschema::validator_for(schema)
        {
            issues.push(ConfigIssue::new("output_schema", format!("invalid JSON Schema: {e}")));
        }
        model::check_options(config.temperature, config.max_tokens, config.max_repairs, &mut issues);
        issues
    }

    async fn run(&self, config: LlmConfig, ctx: &mut StepContext) -> StepResult {
        let options = Options {
            provider: config.provider.clone(),
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            seed: config.seed,
            timeout: config.timeout,
        };
        let validator = model::validator(config.output_schema.as_ref(), "output_schema")?;
        let messages =
            model::opening(config.system.as_deref(), config.output_schema.as_ref(), "Answer", &config.prompt);
        let mut request = options.request(messages);
        request.answer_schema =
            config.output_schema.clone().map(|schema| AnswerSchema { name: "answer".to_owned(), schema });

        let mut calls = Calls::default();
        let Some(validator) = validator else {
            let response = model::call(ctx, &self.model, &request, &mut calls).await?;
            return Ok(output(
                "text",
                Value::String(response.content.unwrap_or_default()),
                &response.finish_reason,
                &calls,
            ));
        };
        let mut last = None;
        for _ in 0..=config.max_repairs.min(model::MAX_REPAIRS) {
            let response = model::call(ctx, &self.model, &request, &mut calls).await?;
            let content = response.content.clone().unwrap_or_default();
            let problem = match model::checked_json(&validator, &content) {
                Ok(value) => return Ok(output("json", value, &response.finish_reason, &calls)),
                Err(problem) => problem,
            };
            request.messages.push(Message::assistant(&response));
            request.messages.push(model::repair(&problem));
            last = Some((problem, content));
        }
        let (problem, content) = last.expect("at least one call");
        Err(StepError::fatal(
            "invalid_output",
            format!(
                "no valid answer after {} model calls; the last answer {} is not valid: {problem}",
                calls.calls,
                model::quote(&content)
            ),
        )
        .into())
    }
}

fn output(key: &str, value: Value, finish_reason: &str, calls: &Calls) -> Value {
    json!({
        key: value,
        "model": calls.model,
        "finish_reason": finish_reason,
        "usage": calls.usage,
        "latency_ms": calls.latency_ms,
        "calls": calls.calls,
    })
}
