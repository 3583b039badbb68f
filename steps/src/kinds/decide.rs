use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{self, Calls, Options};
use crate::llm::{AnswerSchema, LanguageModel, Message};
use crate::{ConfigIssue, Step, StepContext, StepError, StepResult};

/// `decide`: the LLM decision node. The model picks one of `choices` for
/// `prompt` and explains why; the choice is the step's path, so later steps
/// `needs: [triage.refund]` exactly as after a `switch`. An answer outside
/// the choices, or malformed, is re-asked with the problem stated (at most
/// `max_repairs` times), then goes to `fallback` if there is one, else the
/// step fails. A confidence below `min_confidence` goes to `fallback`.
pub struct Decide {
    model: Arc<dyn LanguageModel>,
}

impl Decide {
    pub fn new(model: Arc<dyn LanguageModel>) -> Self {
        Self { model }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideConfig {
    /// Choice name -> what it means (shown to the model).
    pub choices: BTreeMap<String, String>,
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub examples: Vec<Example>,
    #[serde(default)]
    pub min_confidence: Option<f64>,
    #[serde(default)]
    pub fallback: Option<String>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub input: String,
    pub choice: String,
}

/// Most choices a decision may offer.
const MAX_CHOICES: usize = 64;

fn choice_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Why an answer was not taken.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    Malformed,
    OutOfSet,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::OutOfSet => "out_of_set",
        }
    }
}

struct Answer {
    choice: String,
    rationale: String,
    confidence: f64,
}

impl Step for Decide {
    const KIND: &'static str = "decide";
    type Config = DecideConfig;
    type Output = Value;

    fn check(config: &DecideConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if config.choices.len() < 2 {
            issues.push(ConfigIssue::new("choices", "needs at least two entries"));
        }
        if config.choices.len() > MAX_CHOICES {
            issues.push(ConfigIssue::new("choices", format!("at most {MAX_CHOICES} entries")));
        }
        for name in config.choices.keys() {
            if !choice_name_ok(name) {
                issues.push(ConfigIssue::new(
                    format!("choices.{name}"),
                    "a choice name has 1 to 64 letters, digits, `_` or `-`, not starting with a digit",
                ));
            }
        }
        if let Some(fallback) = &config.fallback
            && !config.choices.contains_key(fallback)
        {
            issues.push(ConfigIssue::new("fallback", format!("{fallback:?} is not one of the choices")));
        }
        if let Some(min) = config.min_confidence {
            if !(0.0..=1.0).contains(&min) {
                issues.push(ConfigIssue::new("min_confidence", "must be between 0 and 1"));
            }
            if config.fallback.is_none() {
                issues.push(ConfigIssue::new("min_confidence", "needs a `fallback` choice to take below it"));
            }
        }
        for (i, example) in config.examples.iter().enumerate() {
            if !config.choices.contains_key(&example.choice) {
                issues.push(ConfigIssue::new(
                    format!("examples[{i}].choice"),
                    format!("{:?} is not one of the choices", example.choice),
                ));
            }
        }
        model::check_options(config.temperature, config.max_tokens, config.max_repairs, &mut issues);
        issues
    }

    fn paths(config: &DecideConfig) -> Option<Vec<String>> {
        Some(config.choices.keys().cloned().collect())
    }

    async fn run(&self, config: DecideConfig, ctx: &mut StepContext) -> StepResult {
        let names: Vec<&str> = config.choices.keys().map(String::as_str).collect();
        let options = Options {
            provider: config.provider.clone(),
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            seed: config.seed,
            timeout: config.timeout,
        };
        let mut messages = vec![Message::system(instructions(&config))];
        for example in &config.examples {
            messages.push(Message::user(example.input.clone()));
            let answer = json!({ "choice": example.choice, "rationale": "(example)", "confidence": 1.0 });
            messages.push(Message {
                role: crate::llm::Role::Assistant,
                content: Some(answer.to_string()),
                tool_calls: Vec::new(),
                tool_call_id: None,
            });
        }
        messages.push(Message::user(config.prompt.clone()));
        let mut request = options.request(messages);
        request.answer_schema = Some(AnswerSchema { name: "decision".to_owned(), schema: answer_schema(&names) });

        let mut calls = Calls::default();
        let mut last = None;
        for _ in 0..=config.max_repairs.min(model::MAX_REPAIRS) {
            let response = model::call(ctx, &self.model, &request, &mut calls).await?;
            let content = response.content.clone().unwrap_or_default();
            match read_answer(&content, &names) {
                Ok(answer) => return Ok(decided(&config, answer, &calls)),
                Err((refusal, problem)) => {
                    request.messages.push(Message::assistant(&response));
                    request.messages.push(Message::user(format!(
                        "That answer cannot be used: {problem}. Answer again with only the JSON object \
                         {{\"choice\", \"rationale\", \"confidence\"}}, the choice one of: {}.",
                        names.join(", ")
                    )));
                    last = Some((refusal, problem, content));
                }
            }
        }
        let (refusal, problem, content) = last.expect("at least one call");
        match &config.fallback {
            Some(fallback) => Ok(fallen_back(fallback, refusal.reason(), &problem, &calls)),
            None => Err(StepError::fatal(
                "invalid_decision",
                format!(
                    "no valid decision after {} model calls; the last answer {} was refused: {problem}",
                    calls.calls,
                    model::quote(&content)
                ),
            )
            .into()),
        }
    }
}

fn instructions(config: &DecideConfig) -> String {
    let mut text = String::new();
    if let Some(system) = &config.system {
        text.push_str(system.trim());
        text.push_str("\n\n");
    }
    text.push_str("You make one decision in an automated workflow: pick the single choice that fits the input best.\n\nChoices:\n");
    for (name, description) in &config.choices {
        text.push_str(&format!("- {name}: {}\n", description.trim()));
    }
    text.push_str(
        "\nAnswer with only a JSON object: {\"choice\": one of the choice names above, \"rationale\": one or two \
         sentences on why, \"confidence\": a number from 0 to 1}.",
    );
    text
}

fn answer_schema(names: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": {
            "choice": { "type": "string", "enum": names },
            "rationale": { "type": "string" },
            "confidence": { "type": "number", "minimum": 0, "maximum": 1 },
        },
        "required": ["choice", "rationale", "confidence"],
        "additionalProperties": false,
    })
}

/// Checks an answer here, whatever the server promised: a JSON object, a
/// choice from the set, a rationale, a finite confidence in [0, 1].
fn read_answer(content: &str, names: &[&str]) -> Result<Answer, (Refusal, String)> {
    let malformed = |m: String| (Refusal::Malformed, m);
    let value = model::parse_json(content).map_err(malformed)?;
    let Value::Object(object) = value else {
        return Err(malformed("the answer is not a JSON object".to_owned()));
    };
    let choice = match object.get("choice") {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(_) => return Err(malformed("`choice` is not a string".to_owned())),
        None => return Err(malformed("`choice` is missing".to_owned())),
    };
    let confidence = match object.get("confidence") {
        Some(Value::Number(n)) => n.as_f64().filter(|c| c.is_finite()),
        // Some models quote numbers.
        Some(Value::String(s)) => s.trim().parse::<f64>().ok().filter(|c| c.is_finite()),
        _ => None,
    };
    let Some(confidence) = confidence else {
        return Err(malformed("`confidence` is missing or not a number".to_owned()));
    };
    if !(0.0..=1.0).contains(&confidence) {
        return Err(malformed(format!("`confidence` is {confidence}, not between 0 and 1")));
    }
    let rationale = match object.get("rationale") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(malformed("`rationale` is missing or not a string".to_owned())),
    };
    if !names.contains(&choice.as_str()) {
        let shown: String = choice.chars().take(64).collect();
        return Err((Refusal::OutOfSet, format!("{shown:?} is not one of the choices")));
    }
    Ok(Answer { choice, rationale, confidence })
}

fn decided(config: &DecideConfig, answer: Answer, calls: &Calls) -> Value {
    let low = config.min_confidence.is_some_and(|min| answer.confidence < min);
    let (path, fallback_used, reason) = match (&config.fallback, low) {
        (Some(fallback), true) => (fallback.clone(), true, Some("low_confidence")),
        _ => (answer.choice.clone(), false, None),
    };
    json!({
        "path": path,
        "choice": path,
        "model_choice": answer.choice,
        "rationale": answer.rationale,
        "confidence": answer.confidence,
        "fallback_used": fallback_used,
        "fallback_reason": reason,
        "model": calls.model,
        "usage": calls.usage,
        "calls": calls.calls,
        "latency_ms": calls.latency_ms,
    })
}

fn fallen_back(fallback: &str, reason: &str, problem: &str, calls: &Calls) -> Value {
    json!({
        "path": fallback,
        "choice": fallback,
        "model_choice": null,
        "rationale": format!("fallback: {problem}"),
        "confidence": null,
        "fallback_used": true,
        "fallback_reason": reason,
        "model": calls.model,
        "usage": calls.usage,
        "calls": calls.calls,
        "latency_ms": calls.latency_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_here() {
        let names = ["bug", "refund"];
        let ok = read_answer(r#"{"choice":"bug","rationale":"crash","confidence":0.9}"#, &names).unwrap();
        assert_eq!((ok.choice.as_str(), ok.confidence), ("bug", 0.9));
        for (content, refusal) in [
            (r#"{"choice":"other","rationale":"x","confidence":0.9}"#, Refusal::OutOfSet),
            (r#"{"choice":"bug","rationale":"x","confidence":19}"#, Refusal::Malformed),
            (r#"{"choice":"bug","rationale":"x"}"#, Refusal::Malformed),
            (r#"{"choice":"bug","confidence":0.5}"#, Refusal::Malformed),
            (r#"["bug"]"#, Refusal::Malformed),
            ("bug", Refusal::Malformed),
        ] {
            assert_eq!(read_answer(content, &names).err().map(|e| e.0), Some(refusal), "{content}");
        }
    }

    #[test]
    fn config_checks() {
        let config: DecideConfig = serde_json::from_value(json!({
            "choices": {"a": "x", "b.c": "y"}, "prompt": "p", "fallback": "z", "min_confidence": 2,
            "examples": [{"input": "i", "choice": "q"}]
        }))
        .unwrap();
        let issues: Vec<String> = Decide::check(&config).into_iter().map(|i| i.path).collect();
        assert_eq!(issues, ["choices.b.c", "fallback", "min_confidence", "examples[0].choice"]);
    }
}
