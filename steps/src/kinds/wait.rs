use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ConfigIssue, Step, StepContext, StepError, StepResult, context::signal_name_problem};

/// `wait`: waits durably for the signal `signal` sent to the run (an
/// approval, a callback), at most `timeout`. A waiting run holds no task, no
/// lease and no timer (unless it has a timeout) and survives restarts.
/// Output: `{signal, payload, actor, received_at_ms}`; on timeout, the step
/// fails with `code: timeout` unless `default` is set, which is then the
/// payload (with `timed_out: true`).
pub struct Wait;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitConfig {
    pub signal: String,
    #[serde(default, deserialize_with = "crate::duration::de_opt")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub default: Option<Value>,
}

impl Step for Wait {
    const KIND: &'static str = "wait";
    type Config = WaitConfig;
    type Output = Value;

    fn check(config: &WaitConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if !config.signal.contains("{{")
            && let Some(problem) = signal_name_problem(&config.signal)
        {
            issues.push(ConfigIssue::new("signal", problem));
        }
        if config.default.is_some() && config.timeout.is_none() {
            issues.push(ConfigIssue::new("default", "is used on timeout; set `timeout` too"));
        }
        issues
    }

    async fn run(&self, config: WaitConfig, ctx: &mut StepContext) -> StepResult {
        if let Some(problem) = signal_name_problem(&config.signal) {
            return Err(StepError::fatal("config", format!("with.signal: {problem}")).into());
        }
        match ctx.wait_signal(&config.signal, config.timeout).await? {
            Some(signal) => Ok(json!({
                "signal": signal.name,
                "payload": signal.payload,
                "actor": signal.actor,
                "received_at_ms": signal.at,
            })),
            None => match config.default {
                Some(payload) => Ok(json!({ "signal": config.signal, "payload": payload, "timed_out": true })),
                None => Err(StepError::fatal(
                    "timeout",
                    format!(
                        "no signal {:?} within {}",
                        config.signal,
                        humantime::format_duration(config.timeout.unwrap_or_default())
                    ),
                )
                .into()),
            },
        }
    }
}
