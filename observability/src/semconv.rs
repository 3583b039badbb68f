//! Attribute and span names: the OpenTelemetry GenAI, HTTP and server
//! conventions Switchyard uses, and its own `switchyard.*` names.
//!
//! The `gen_ai.*` names live here as plain constants: the
//! `opentelemetry-semantic-conventions` crate marks its copies deprecated
//! while they move to a separate registry.

// GenAI (https://opentelemetry.io/docs/specs/semconv/gen-ai/).
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
pub const GEN_AI_REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
pub const GEN_AI_INPUT_MESSAGES: &str = "gen_ai.input.messages";
pub const GEN_AI_OUTPUT_MESSAGES: &str = "gen_ai.output.messages";
pub const GEN_AI_AGENT_NAME: &str = "gen_ai.agent.name";
pub const GEN_AI_TOOL_NAME: &str = "gen_ai.tool.name";
pub const GEN_AI_TOOL_CALL_ID: &str = "gen_ai.tool.call.id";
pub const GEN_AI_TOOL_CALL_ARGUMENTS: &str = "gen_ai.tool.call.arguments";
pub const GEN_AI_TOOL_CALL_RESULT: &str = "gen_ai.tool.call.result";
pub const GEN_AI_WORKFLOW_NAME: &str = "gen_ai.workflow.name";
pub const GEN_AI_TOKEN_TYPE: &str = "gen_ai.token.type";

/// Values of [`GEN_AI_OPERATION_NAME`].
pub const OP_CHAT: &str = "chat";
pub const OP_INVOKE_AGENT: &str = "invoke_agent";
pub const OP_EXECUTE_TOOL: &str = "execute_tool";
pub const OP_INVOKE_WORKFLOW: &str = "invoke_workflow";

// GenAI metrics.
pub const GEN_AI_CLIENT_TOKEN_USAGE: &str = "gen_ai.client.token.usage";
pub const GEN_AI_CLIENT_OPERATION_DURATION: &str = "gen_ai.client.operation.duration";

// HTTP and network.
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_FULL: &str = "url.full";
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
pub const ERROR_TYPE: &str = "error.type";

// Switchyard's own.
pub const RUN_ID: &str = "switchyard.run.id";
pub const RUN_STATUS: &str = "switchyard.run.status";
pub const RUN_SEGMENT: &str = "switchyard.run.segment";
pub const WORKFLOW_VERSION: &str = "switchyard.workflow.version";
pub const STEP_ID: &str = "switchyard.step.id";
pub const STEP_KIND: &str = "switchyard.step.kind";
pub const STEP_ATTEMPT: &str = "switchyard.step.attempt";
pub const STEP_ATTEMPTS: &str = "switchyard.step.attempts";
pub const STEP_STATUS: &str = "switchyard.step.status";
pub const STEP_ERROR_CODE: &str = "switchyard.step.error.code";
pub const STEP_SKIP_REASON: &str = "switchyard.step.skip_reason";
pub const STEP_REUSED_FROM: &str = "switchyard.step.reused_from";
pub const STEP_RETRY_AT: &str = "switchyard.step.retry_at";
pub const STEP_INPUT: &str = "switchyard.step.input";
pub const STEP_OUTPUT: &str = "switchyard.step.output";
pub const LLM_CALL_ATTEMPTS: &str = "switchyard.llm.call_attempts";
pub const LLM_USAGE_ESTIMATED: &str = "switchyard.llm.usage_estimated";
pub const DECISION_CHOICE: &str = "switchyard.decision.choice";
pub const DECISION_PATH: &str = "switchyard.decision.path";
pub const DECISION_CONFIDENCE: &str = "switchyard.decision.confidence";
pub const DECISION_FALLBACK_USED: &str = "switchyard.decision.fallback_used";
pub const DECISION_FALLBACK_REASON: &str = "switchyard.decision.fallback_reason";
pub const DECISION_MODEL_CHOICE: &str = "switchyard.decision.model_choice";
pub const DECISION_RATIONALE: &str = "switchyard.decision.rationale";
pub const TOOL_OK: &str = "switchyard.tool.ok";
