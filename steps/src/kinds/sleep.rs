use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ConfigIssue, Step, StepContext, StepError, StepResult};

/// `sleep`: waits durably for `duration` or `until` an RFC 3339 time. A
/// sleeping run holds no task and survives restarts. Output:
/// `{until_ms, woke_at_ms}`.
pub struct Sleep;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepConfig {
    #[serde(default, deserialize_with = "crate::duration::de_opt")]
    pub duration: Option<Duration>,
    /// RFC 3339, e.g. `2026-12-01T09:00:00Z`; may be a template.
    #[serde(default)]
    pub until: Option<String>,
}

impl Step for Sleep {
    const KIND: &'static str = "sleep";
    type Config = SleepConfig;
    type Output = Value;

    fn check(config: &SleepConfig) -> Vec<ConfigIssue> {
        match (&config.duration, &config.until) {
            (Some(_), None) | (None, Some(_)) => Vec::new(),
            _ => vec![ConfigIssue::new("", "set exactly one of `duration` or `until`")],
        }
    }

    async fn run(&self, config: SleepConfig, ctx: &mut StepContext) -> StepResult {
        let until_ms = match (config.duration, config.until) {
            (Some(d), None) => ctx.sleep(d).await?,
            (None, Some(until)) => {
                let at = humantime::parse_rfc3339_weak(until.trim()).map_err(|e| {
                    StepError::fatal("config", format!("with.until: {until:?} is not an RFC 3339 time: {e}"))
                })?;
                let at_ms = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
                ctx.sleep_until(at_ms)?;
                at_ms
            }
            _ => return Err(StepError::fatal("config", "set exactly one of `duration` or `until`").into()),
        };
        Ok(json!({ "woke_at_ms": ctx.now_ms(), "until_ms": until_ms }))
    }
}
