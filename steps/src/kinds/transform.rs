use serde_json::Value;

use crate::{Step, StepContext, StepResult};

/// `transform`: its output is its `with` block, rendered. Any JSON shape;
/// a string that is exactly one `{{ expression }}` becomes that value.
pub struct Transform;

impl Step for Transform {
    const KIND: &'static str = "transform";
    type Config = Value;
    type Output = Value;

    async fn run(&self, config: Value, _ctx: &mut StepContext) -> StepResult {
        Ok(config)
    }
}
