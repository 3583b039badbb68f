use serde::Deserialize;
use serde_json::Value;

use crate::{Step, StepContext, StepError, StepResult};

/// `fail`: ends the run with a message (not retried).
pub struct Fail;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailConfig {
    pub message: String,
    #[serde(default)]
    pub code: Option<String>,
}

impl Step for Fail {
    const KIND: &'static str = "fail";
    type Config = FailConfig;
    type Output = Value;

    async fn run(&self, config: FailConfig, _ctx: &mut StepContext) -> StepResult {
        let code = config.code.unwrap_or_else(|| "failed".to_owned());
        Err(StepError::fatal(code, config.message).into())
    }
}
