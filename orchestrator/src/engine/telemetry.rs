//! Spans and metrics from the journal.
//!
//! A run's telemetry is a fold of its journal, like its state: the driver
//! folds what it loads (nothing is reported for it: that happened in an
//! earlier process, which reported it), then every batch of events it
//! commits ([`RunTelemetry::committed`]). A span is reported when the event
//! that ends it is committed, so a step whose result came from the journal
//! (a replay after a crash, a resume) gets no second span.
//!
//! Span ids are derived from the run, step, attempt and operation they
//! stand for, so a span started in one process and ended by the next after
//! a crash keeps its id, and its children their parent. A resumed run (after
//! `runs resume`) is a new run span in the same trace, linked to the one it
//! continues; an attempt cut short by a crash is reported as `interrupted`
//! when the next process starts its successor, which links to it.
//!
//! Content (inputs, outputs, model answers, rationales, tool arguments and
//! results) goes on spans only with `SWITCHYARD_OTEL_CAPTURE_CONTENT=true`,
//! and never idempotency keys.

use std::sync::Arc;

use serde_json::Value;
use switchyard_observability::semconv::*;
use switchyard_observability::{Attr, Kind, ModelCall, Span, SpanContext, SpanIds, Telemetry, derived_span_id};

use crate::journal::{Event, RunStatus};
use crate::report::Prices;
use crate::store::JournalEntry;
use crate::workflow::{StepKind, Workflow};

/// Longest content value put on a span (characters).
const MAX_CONTENT: usize = 8 * 1024;

/// Where a run's trace hangs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TraceParent {
    /// A root run: under the caller's span, if one was given (stored in
    /// `run_started`).
    Root,
    /// A child run: under the parent's attempt span (`None`: the parent
    /// is not traced); `confidential` when a run above it is.
    Child { span: Option<SpanContext>, confidential: bool },
}

#[derive(Debug, Default)]
struct StepTrace {
    /// The step span, while open: when it started and in which segment.
    span: Option<(i64, u32)>,
    attempts: u32,
    attempt: Option<Attempt>,
    /// The attempt about to start (see [`RunTelemetry::attempt_context`]).
    next: Option<Rendered>,
    /// Its only attempt's span was reported as the step's.
    merged: bool,
}

#[derive(Debug)]
struct Attempt {
    n: u32,
    /// Its span id.
    id: [u8; 8],
    start: i64,
    /// The interrupted attempt this one follows.
    link: Option<[u8; 8]>,
    /// A model call whose earlier tries failed: its first op and start.
    chat: Option<(u32, i64, u32)>,
    /// The http step's method and URL (without query and userinfo).
    http: Option<(String, String)>,
    /// Redacted and cut to size.
    input: Option<String>,
}

pub(crate) struct RunTelemetry {
    tel: Telemetry,
    prices: Arc<Prices>,
    /// Spans are reported (the trace is sampled).
    spans: bool,
    capture: bool,
    /// This run's workflow, or one that called it, is confidential.
    confidential: bool,
    trace_id: [u8; 16],
    ids: SpanIds,
    parent: Option<[u8; 8]>,
    parent_remote: bool,
    run_id: String,
    wf: Arc<Workflow>,
    wf_name: Arc<str>,
    segment: u32,
    /// The span id of the current segment's run span.
    run_span: [u8; 8],
    run_start: i64,
    first_start: i64,
    /// By step index.
    steps: Vec<StepTrace>,
    /// The latest time the journal shows.
    last_at: i64,
    /// Spans ended by the events being applied, sent together.
    out: Vec<Span>,
    /// `step_reused` events folded: `(from run, step, at)`.
    reused: Vec<(String, String, i64)>,
}

/// An attempt about to start: its number and span id, the http request's
/// method and URL, and its input (with content capture).
#[derive(Debug)]
struct Rendered {
    attempt: u32,
    id: [u8; 8],
    http: Option<(String, String)>,
    /// Redacted and cut to size.
    input: Option<String>,
}

impl RunTelemetry {
    /// The run's telemetry folded from `entries`; `None` when nothing is
    /// reported (no export, no metrics, or not sampled).
    pub fn fold(
        tel: &Telemetry,
        prices: &Arc<Prices>,
        wf: &Arc<Workflow>,
        run_id: &str,
        parent: TraceParent,
        entries: &[JournalEntry],
    ) -> Option<Box<Self>> {
        if !tel.is_tracing() && tel.metrics().is_none() {
            return None;
        }
        let (trace_id, parent_span, parent_remote) = match parent {
            TraceParent::Root => {
                let caller = entries.iter().find_map(|e| match &e.event {
                    Event::RunStarted { trace, .. } => trace.as_deref().and_then(|t| SpanContext::parse(t).ok()),
                    _ => None,
                });
                let trace_id = caller.map(|c| c.trace_id).unwrap_or_else(|| root_trace_id(run_id));
                (trace_id, caller, true)
            }
            TraceParent::Child { span: Some(c), .. } => (c.trace_id, Some(c), false),
            TraceParent::Child { span: None, .. } => ([0; 16], None, false),
        };
        let (spans, confidential_above) = match parent {
            TraceParent::Root => (tel.sampled(trace_id, parent_span.as_ref()), false),
            TraceParent::Child { span, confidential } => {
                (span.is_some_and(|p| p.sampled) && tel.is_tracing(), confidential)
            }
        };
        if !spans && tel.metrics().is_none() {
            return None;
        }
        let mut t = Box::new(Self {
            tel: tel.clone(),
            prices: prices.clone(),
            spans,
            capture: tel.capture_content() && !wf.confidential() && !confidential_above,
            confidential: wf.confidential() || confidential_above,
            trace_id,
            ids: SpanIds::new(&trace_id, run_id),
            parent: parent_span.map(|p| p.span_id),
            parent_remote,
            run_id: run_id.to_owned(),
            wf: wf.clone(),
            wf_name: wf.shared_name.clone(),
            segment: 0,
            run_span: [0; 8],
            run_start: 0,
            first_start: 0,
            steps: (0..wf.steps.len()).map(|_| StepTrace::default()).collect(),
            last_at: 0,
            out: Vec::new(),
            reused: Vec::new(),
        });
        t.run_span = t.run_span_id(0);
        for entry in entries {
            t.apply(entry.at, &entry.event, false);
        }
        Some(t)
    }

    /// The run span of the current segment (whether or not it is exported:
    /// logs name it).
    pub fn run_context(&self) -> SpanContext {
        self.context(self.run_span)
    }

    /// Content may go on this run's spans (and its children's).
    pub fn captures_content(&self) -> bool {
        self.capture
    }

    /// The span context an attempt's outbound calls carry, and its child
    /// runs hang under.
    pub fn attempt_context(&mut self, step: &str, attempt: u32) -> Option<SpanContext> {
        if !self.spans {
            return None;
        }
        let id = self.attempt_id(step, attempt);
        if let Some(st) = self.st_mut(step) {
            st.next = Some(Rendered { attempt, id, http: None, input: None });
        }
        Some(self.context(id))
    }

    /// What the driver rendered for attempt `attempt` it starts (the http
    /// request's method and URL; the input, if content is captured); kept
    /// until its `step_started` is committed.
    pub fn started(&mut self, step: &str, attempt: u32, input: &Value) {
        if !self.spans {
            return;
        }
        let confidential = self.confidential;
        let http = (self.kind(step) == "http").then(|| {
            let method = input.get("method").and_then(Value::as_str).unwrap_or("GET").to_ascii_uppercase();
            let url = clean_url(input.get("url").and_then(Value::as_str).unwrap_or_default());
            // A confidential workflow's URL paths may name what it works on.
            (method, if confidential { origin(&url) } else { url })
        });
        let input = self.capture.then(|| content(&redacted(input)));
        if let Some(r) = self.st_mut(step).and_then(|s| s.next.as_mut()).filter(|r| r.attempt == attempt) {
            r.http = http;
            r.input = input;
        }
    }

    fn st(&self, step: &str) -> Option<&StepTrace> {
        self.wf.step_index(step).map(|i| &self.steps[i])
    }

    fn st_mut(&mut self, step: &str) -> Option<&mut StepTrace> {
        self.wf.step_index(step).map(|i| &mut self.steps[i])
    }

    /// Takes the step's state out (the step ended), leaving it empty.
    fn take(&mut self, step: &str) -> Option<StepTrace> {
        self.st_mut(step).map(std::mem::take)
    }

    /// The span id of attempt `attempt` of `step`: the open one's, kept.
    fn open_attempt_id(&self, step: &str, attempt: u32) -> [u8; 8] {
        match self.st(step).and_then(|s| s.attempt.as_ref()) {
            Some(a) if a.n == attempt => a.id,
            _ => self.attempt_id(step, attempt),
        }
    }

    /// Events just committed at `at`.
    pub fn committed(&mut self, at: i64, events: &[Event]) {
        for event in events {
            self.apply(at, event, true);
        }
        if !self.out.is_empty() {
            self.tel.emit_all(self.out.drain(..));
        }
    }

    /// Step `step` runs a confidential workflow (a `workflow` or `map`
    /// child, an agent's workflow tool).
    fn calls_confidential(&self, step: &str) -> bool {
        let Some(i) = self.wf.step_index(step) else { return false };
        match &self.wf.steps[i].kind {
            StepKind::Call { child, .. } | StepKind::Map { child, .. } => child.confidential(),
            StepKind::Action { tools: Some(tools), .. } => tools.values().any(|w| w.confidential()),
            _ => false,
        }
    }

    /// The step's id as an attribute value (shared, not copied).
    fn step_attr(&self, step: &str) -> Attr {
        match self.wf.step_index(step) {
            Some(i) => Attr::Shared(self.wf.steps[i].shared_id.clone()),
            None => Attr::from(step),
        }
    }

    fn step_index(&self, step: &str) -> u32 {
        self.wf.step_index(step).map_or(u32::MAX, |i| i as u32)
    }

    fn run_span_id(&self, segment: u32) -> [u8; 8] {
        self.ids.id(0, segment, 0, 0)
    }

    fn step_span_id(&self, step: &str, segment: u32) -> [u8; 8] {
        self.ids.id(1, self.step_index(step), segment, 0)
    }

    fn attempt_id(&self, step: &str, attempt: u32) -> [u8; 8] {
        // Attempts past 2^20 (retries across many resumes) keep distinct ids.
        self.ids.id(2, self.step_index(step), attempt, attempt >> 20)
    }

    fn op_id(&self, step: &str, attempt: u32, index: u32) -> [u8; 8] {
        self.ids.id(3, self.step_index(step), attempt, index)
    }

    fn context(&self, span_id: [u8; 8]) -> SpanContext {
        SpanContext { trace_id: self.trace_id, span_id, sampled: true }
    }

    fn kind(&self, step: &str) -> &'static str {
        self.wf.step_index(step).map_or("unknown", |i| kind_of(&self.wf, i))
    }

    fn emit(&mut self, span: Span) {
        if self.spans {
            self.out.push(span);
        }
    }

    fn apply(&mut self, at: i64, event: &Event, live: bool) {
        self.last_at = self.last_at.max(at);
        match event {
            Event::RunStarted { .. } => {
                self.run_start = at;
                self.first_start = at;
            }
            Event::RunResumed { .. } => {
                self.segment += 1;
                self.run_span = self.run_span_id(self.segment);
                self.run_start = at;
            }
            Event::StepStarted { step, attempt } => {
                let interrupted = self.st(step).and_then(|s| s.attempt.as_ref()).map(|a| (a.id, a.start));
                let mut link = None;
                if let Some((id, start)) = interrupted {
                    // The attempt before this one never ended: its process
                    // stopped. Reported now, by the process that goes on.
                    link = Some(id);
                    if live {
                        let end = self.last_at.max(start);
                        let why = Some(("interrupted", "the process running it stopped".to_owned()));
                        self.end_attempt(step, end, "interrupted", why, None, false);
                    } else if let Some(st) = self.st_mut(step) {
                        st.attempt = None;
                    }
                }
                let segment = self.segment;
                let (id, http, input) = match self.st_mut(step).and_then(|s| s.next.take()) {
                    Some(r) if r.attempt == *attempt => (r.id, r.http, r.input),
                    _ if !self.spans => ([0; 8], None, None),
                    _ => (self.attempt_id(step, *attempt), None, None),
                };
                let Some(st) = self.st_mut(step) else { return };
                st.span.get_or_insert((at, segment));
                st.attempts += 1;
                st.attempt = Some(Attempt { n: *attempt, id, start: at, link, chat: None, http, input });
            }
            Event::StepOp { step, attempt, index, name, value, at: op_at } => {
                if live {
                    self.op(step, *attempt, *index, name, value, op_at.unwrap_or(at));
                } else if name == switchyard_steps::llm::CALL_OP
                    && let Some(a) = self.st_mut(step).and_then(|s| s.attempt.as_mut())
                {
                    // A model call's failed tries before a crash: the call
                    // spans them when it ends here. An answered call was
                    // reported when it was committed.
                    fold_chat(a, *index, value, op_at.unwrap_or(at));
                    if value.get("outcome").and_then(Value::as_str) == Some("answered") {
                        a.chat = None;
                    }
                }
            }
            Event::StepSucceeded { step, output, .. } => {
                if live {
                    self.end_attempt(step, at, "succeeded", None, Some(output), true);
                    self.end_step(step, at, "succeeded", None, &[]);
                } else {
                    self.take(step);
                }
            }
            Event::StepFailed { step, error, retry_at, continued, .. } => {
                if !live {
                    if retry_at.is_some() {
                        if let Some(st) = self.st_mut(step) {
                            st.attempt = None;
                        }
                    } else {
                        self.take(step);
                    }
                    return;
                }
                let status = match (retry_at, error.code.as_str()) {
                    (Some(_), _) => "retrying",
                    (None, "cancelled") => "cancelled",
                    _ => "failed",
                };
                // An error's message may quote content (a model's answer, a
                // response body): only its code, unless content is captured.
                let why = if self.capture {
                    truncate(&format!("{}: {}", error.code, error.message))
                } else {
                    error.code.clone()
                };
                let code = error.code.as_str();
                self.end_attempt(step, at, status, Some((code, why.clone())), None, retry_at.is_none());
                if retry_at.is_none() {
                    let status = if *continued { "continued" } else { status };
                    self.end_step(step, at, status, Some((code, &why)), &[]);
                }
            }
            Event::StepSkipped { step, reason } => {
                if live {
                    let segment = self.segment;
                    if let Some(st) = self.st_mut(step) {
                        st.span = Some((at, segment));
                    }
                    self.end_step(step, at, "skipped", None, &[(STEP_SKIP_REASON, Attr::from(reason.as_str()))]);
                }
            }
            // Written with the run's start, so only ever folded: reported
            // when the run first ends (see `finish`).
            Event::StepReused { step, from_run, .. } => {
                if self.spans {
                    self.reused.push((from_run.clone(), step.clone(), at));
                }
            }
            Event::RunFinished { status, error, .. } => {
                if live {
                    self.finish(at, *status, error.as_ref());
                } else {
                    // What was open then was reported, ended, with the run.
                    self.steps.iter_mut().for_each(|s| *s = StepTrace::default());
                    self.reused.clear();
                }
            }
            Event::StepSuspended { .. }
            | Event::StepWaiting { .. }
            | Event::SignalReceived { .. }
            | Event::RunParked { .. }
            | Event::CancelRequested { .. } => {}
        }
    }

    fn op(&mut self, step: &str, attempt: u32, index: u32, name: &str, value: &Value, at: i64) {
        if name == switchyard_steps::llm::CALL_OP {
            let Some(a) = self.st_mut(step).and_then(|s| s.attempt.as_mut()) else { return };
            fold_chat(a, index, value, at);
            if value.get("outcome").and_then(Value::as_str) == Some("answered") {
                let (first, start, tries) = a.chat.take().unwrap_or((index, at, 1));
                self.chat_span(step, attempt, first, start, at, tries, value, None);
            }
        } else if name == "tool_call" && self.spans {
            let id = self.op_id(step, attempt, index);
            let tool = value.get("tool").and_then(Value::as_str).unwrap_or("tool");
            let ok = value.get("ok").and_then(Value::as_bool).unwrap_or(false);
            let mut attributes = vec![
                (GEN_AI_OPERATION_NAME, Attr::Static(OP_EXECUTE_TOOL)),
                (GEN_AI_TOOL_NAME, Attr::from(tool)),
                (TOOL_OK, Attr::from(ok)),
            ];
            if let Some(call_id) = value.get("call_id").and_then(Value::as_str) {
                attributes.push((GEN_AI_TOOL_CALL_ID, Attr::from(call_id)));
            }
            if self.capture
                && !self.calls_confidential(step)
                && let Some(result) = value.get("result")
            {
                attributes.push((GEN_AI_TOOL_CALL_RESULT, Attr::from(content(&redacted(result)))));
            }
            let start = self.st(step).and_then(|s| s.attempt.as_ref()).map_or(at, |a| a.start.max(at));
            self.emit(Span {
                context: self.context(id),
                parent: Some(self.open_attempt_id(step, attempt)),
                parent_remote: false,
                kind: Kind::Internal,
                name: format!("{OP_EXECUTE_TOOL} {tool}"),
                start_ms: start,
                end_ms: at,
                attributes,
                error: (!ok).then(|| "the tool call failed".to_owned()),
                links: vec![],
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn chat_span(
        &mut self,
        step: &str,
        attempt: u32,
        first: u32,
        start: i64,
        end: i64,
        tries: u32,
        value: &Value,
        error: Option<&str>,
    ) {
        let s = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or_default();
        let usage = switchyard_steps::llm::usage_of_op(switchyard_steps::llm::CALL_OP, value).unwrap_or_default();
        let provider = match s("system") {
            "" => "openai",
            system => system,
        };
        let request_model = match s("request_model") {
            "" => s("model"),
            m => m,
        };
        if let Some(m) = self.tel.metrics() {
            m.model_call(&ModelCall {
                provider,
                request_model,
                response_model: s("model"),
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                seconds: (end - start).max(0) as f64 / 1000.0,
                error,
                cost: self.prices.cost(s("model"), usage.input_tokens, usage.output_tokens),
            });
        }
        if !self.spans {
            return;
        }
        let mut attributes = vec![
            (GEN_AI_OPERATION_NAME, Attr::Static(OP_CHAT)),
            (GEN_AI_PROVIDER_NAME, Attr::from(provider)),
            (GEN_AI_REQUEST_MODEL, Attr::from(request_model)),
            (LLM_CALL_ATTEMPTS, Attr::from(tries)),
        ];
        if error.is_none() {
            attributes.extend([
                (GEN_AI_RESPONSE_MODEL, Attr::from(s("model"))),
                (GEN_AI_RESPONSE_FINISH_REASONS, Attr::Strs(vec![s("finish_reason").to_owned()])),
                (GEN_AI_USAGE_INPUT_TOKENS, Attr::from(usage.input_tokens)),
                (GEN_AI_USAGE_OUTPUT_TOKENS, Attr::from(usage.output_tokens)),
            ]);
            if value.get("usage_estimated").and_then(Value::as_bool) == Some(true) {
                attributes.push((LLM_USAGE_ESTIMATED, Attr::from(true)));
            }
        }
        if let Some((host, port)) = server(s("server")) {
            attributes.push((SERVER_ADDRESS, Attr::from(host)));
            if let Some(port) = port {
                attributes.push((SERVER_PORT, Attr::Int(port.into())));
            }
        }
        if self.capture && error.is_none() {
            let message = serde_json::json!([{
                "role": "assistant",
                "parts": output_parts(value),
                "finish_reason": s("finish_reason"),
            }]);
            attributes.push((GEN_AI_OUTPUT_MESSAGES, Attr::from(content(&message))));
        }
        let name = match request_model {
            "" => OP_CHAT.to_owned(),
            m => format!("{OP_CHAT} {m}"),
        };
        self.emit(Span {
            context: self.context(self.op_id(step, attempt, first)),
            parent: Some(self.open_attempt_id(step, attempt)),
            parent_remote: false,
            kind: Kind::Client,
            name,
            start_ms: start,
            end_ms: end,
            attributes,
            error: error.map(str::to_owned),
            links: vec![],
        });
    }

    /// Ends the open attempt of `step`; `last`: the step ends with it. A
    /// step whose only attempt this is gets no span of its own: this span
    /// stands for both, under the run (a step span appears once there are
    /// attempts to group).
    fn end_attempt(
        &mut self,
        step: &str,
        at: i64,
        status: &'static str,
        error: Option<(&str, String)>,
        output: Option<&Value>,
        last: bool,
    ) {
        let kind = self.kind(step);
        let Some(st) = self.st_mut(step) else { return };
        let alone = last && st.attempts == 1;
        let Some(a) = st.attempt.take() else { return };
        // Its span stands for the step's: no step span follows.
        st.merged = alone;
        if let Some(m) = self.tel.metrics()
            && status != "interrupted"
        {
            m.attempt_ended(kind, status, (at - a.start).max(0) as f64 / 1000.0);
        }
        // A model call still failing when its attempt ended.
        if let Some((first, start, tries)) = a.chat {
            self.chat_span(step, a.n, first, start, at, tries, &Value::Null, Some("unavailable"));
        }
        if !self.spans {
            return;
        }
        let mut attributes = vec![
            (STEP_ID, self.step_attr(step)),
            (STEP_KIND, Attr::Static(kind)),
            (STEP_ATTEMPT, Attr::from(a.n)),
            (STEP_STATUS, Attr::Static(status)),
            (GEN_AI_WORKFLOW_NAME, Attr::Shared(self.wf_name.clone())),
        ];
        let (name, span_kind) = match kind {
            "agent" => {
                attributes.push((GEN_AI_OPERATION_NAME, Attr::Static(OP_INVOKE_AGENT)));
                attributes.push((GEN_AI_AGENT_NAME, Attr::from(step)));
                (format!("{OP_INVOKE_AGENT} {step}"), Kind::Internal)
            }
            "http" => {
                // Unknown for an attempt started by an earlier process.
                let (method, url) = a.http.clone().unwrap_or_else(|| ("_OTHER".to_owned(), String::new()));
                attributes.push((HTTP_REQUEST_METHOD, Attr::from(method.as_str())));
                if !url.is_empty() {
                    attributes.push((URL_FULL, Attr::from(url)));
                }
                let name = if method == "_OTHER" { "HTTP".to_owned() } else { method };
                (name, Kind::Client)
            }
            other => (format!("{other} {step}"), Kind::Internal),
        };
        if let Some(code) = output.and_then(|o| o.get("status")).and_then(Value::as_i64).filter(|_| kind == "http") {
            attributes.push((HTTP_RESPONSE_STATUS_CODE, Attr::Int(code)));
        }
        if let (Some((code, _)), "http") = (&error, kind)
            && let Some(status) = http_status_in(code)
        {
            attributes.push((HTTP_RESPONSE_STATUS_CODE, Attr::Int(status)));
        }
        if let Some((code, _)) = &error {
            attributes.push((STEP_ERROR_CODE, Attr::from(*code)));
            attributes.push((ERROR_TYPE, Attr::from(*code)));
        }
        if kind == "decide"
            && let Some(out) = output
        {
            decision_attrs(out, self.capture, &mut attributes);
        }
        if self.capture {
            if let Some(input) = a.input {
                attributes.push((STEP_INPUT, Attr::from(input)));
            }
            // A child workflow that is confidential keeps its output off
            // its caller's span too.
            if let Some(out) = output.filter(|_| !self.calls_confidential(step)) {
                attributes.push((STEP_OUTPUT, Attr::from(content(&redacted(out)))));
            }
        }
        let links = a.link.map(|l| vec![self.context(l)]).unwrap_or_default();
        let parent = if alone {
            attributes.push((STEP_ATTEMPTS, Attr::from(1u32)));
            Some(self.run_span)
        } else {
            self.st(step).and_then(|s| s.span).map(|(_, seg)| self.step_span_id(step, seg))
        };
        self.emit(Span {
            context: self.context(a.id),
            parent,
            parent_remote: false,
            kind: span_kind,
            name,
            start_ms: a.start,
            end_ms: at,
            attributes,
            error: error.map(|(_, why)| why),
            links,
        });
    }

    fn end_step(
        &mut self,
        step: &str,
        at: i64,
        status: &str,
        error: Option<(&str, &str)>,
        extra: &[(&'static str, Attr)],
    ) {
        let kind = self.kind(step);
        let Some(st) = self.take(step) else { return };
        let Some((start, segment)) = st.span else { return };
        // Its only attempt's span stands for the step (see `end_attempt`).
        if !self.spans || st.merged {
            return;
        }
        let mut attributes = vec![
            (STEP_ID, self.step_attr(step)),
            (STEP_KIND, Attr::Static(kind)),
            (STEP_STATUS, Attr::from(status)),
            (STEP_ATTEMPTS, Attr::from(st.attempts)),
            (GEN_AI_WORKFLOW_NAME, Attr::Shared(self.wf_name.clone())),
        ];
        attributes.extend(extra.iter().cloned());
        if let Some((code, _)) = error {
            attributes.push((STEP_ERROR_CODE, Attr::from(code)));
        }
        self.emit(Span {
            context: self.context(self.step_span_id(step, segment)),
            parent: Some(self.run_span),
            parent_remote: false,
            kind: Kind::Internal,
            name: format!("step {step}"),
            start_ms: start,
            end_ms: at,
            attributes,
            error: error.filter(|_| status != "continued").map(|(_, why)| why.to_owned()),
            links: vec![],
        });
    }

    fn finish(&mut self, at: i64, status: RunStatus, error: Option<&switchyard_steps::StepError>) {
        // Attempts still open (cancelled with the run) end with it.
        let open: Vec<String> = self
            .steps
            .iter()
            .zip(&self.wf.steps)
            .filter(|(s, _)| s.attempt.is_some())
            .map(|(_, w)| w.id.clone())
            .collect();
        for step in open {
            let why = Some((status.as_str(), format!("the run ended {status}")));
            self.end_attempt(&step, at, status.as_str(), why, None, true);
        }
        // Steps whose spans are open (a retry was due, attempts are grouped)
        // end with the run.
        let grouped: Vec<String> = self
            .steps
            .iter()
            .zip(&self.wf.steps)
            .filter(|(s, _)| s.span.is_some() && !s.merged)
            .map(|(_, w)| w.id.clone())
            .collect();
        for step in grouped {
            let why = format!("the run ended {status}");
            self.end_step(&step, at, status.as_str(), Some((status.as_str(), &why)), &[]);
        }
        // Steps a re-run copied (written with its start): reported once,
        // with the run's first end.
        if self.segment == 0 {
            for (from_run, step, reused_at) in std::mem::take(&mut self.reused) {
                let segment = self.segment;
                if let Some(st) = self.st_mut(&step) {
                    *st = StepTrace { span: Some((reused_at, segment)), ..Default::default() };
                }
                self.end_step(&step, reused_at, "reused", None, &[(STEP_REUSED_FROM, Attr::from(from_run))]);
            }
        }
        if let Some(m) = self.tel.metrics()
            && self.parent.is_none_or(|_| self.parent_remote)
            && !self.run_id.contains('/')
        {
            m.run_finished(self.wf.name(), status.as_str(), (at - self.first_start).max(0) as f64 / 1000.0);
        }
        if !self.spans {
            return;
        }
        let mut attributes = vec![
            (GEN_AI_OPERATION_NAME, Attr::Static(OP_INVOKE_WORKFLOW)),
            (GEN_AI_WORKFLOW_NAME, Attr::Shared(self.wf_name.clone())),
            (RUN_ID, Attr::from(self.run_id.as_str())),
            (WORKFLOW_VERSION, Attr::from(self.wf.version())),
            (RUN_STATUS, Attr::Static(status.as_str())),
        ];
        if self.segment > 0 {
            attributes.push((RUN_SEGMENT, Attr::from(self.segment)));
        }
        if let Some(e) = error {
            attributes.push((ERROR_TYPE, Attr::from(e.code.as_str())));
        }
        let links = if self.segment > 0 { vec![self.context(self.run_span_id(self.segment - 1))] } else { Vec::new() };
        self.emit(Span {
            context: self.context(self.run_span),
            parent: self.parent,
            parent_remote: self.parent_remote && self.parent.is_some(),
            kind: Kind::Internal,
            name: format!("{OP_INVOKE_WORKFLOW} {}", self.wf.name()),
            start_ms: self.run_start,
            end_ms: at,
            attributes,
            error: (status != RunStatus::Succeeded).then(|| match error {
                Some(e) if self.capture => truncate(&format!("{}: {}", e.code, e.message)),
                Some(e) => e.code.clone(),
                None => status.as_str().to_owned(),
            }),
            links,
        });
        self.steps.iter_mut().for_each(|s| *s = StepTrace::default());
    }
}

/// A model call op seen: a failed try opens (or extends) the logical call.
fn fold_chat(a: &mut Attempt, index: u32, value: &Value, at: i64) {
    match a.chat.as_mut() {
        Some(chat) => chat.2 += 1,
        None => {
            let latency = value.get("latency_ms").and_then(Value::as_i64).unwrap_or(0);
            a.chat = Some((index, at - latency, 1));
        }
    }
}

/// The trace id of a root run started without a caller's span: its id (a
/// UUID), so the trace is found by the run id.
pub(crate) fn root_trace_id(run_id: &str) -> [u8; 16] {
    match uuid::Uuid::parse_str(run_id) {
        Ok(u) if !u.is_nil() => *u.as_bytes(),
        _ => {
            let id = derived_span_id(&[0; 16], &["trace", run_id]);
            let mut t = [0u8; 16];
            t[..8].copy_from_slice(&id);
            t[8..].copy_from_slice(&derived_span_id(&[1; 16], &["trace", run_id]));
            t
        }
    }
}

fn kind_of(wf: &Workflow, i: usize) -> &'static str {
    match &wf.steps[i].kind {
        StepKind::Action { step, .. } => step.kind(),
        other => other.name(),
    }
}

/// `url` without its query, fragment and userinfo.
fn clean_url(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => no_query.to_owned(),
    }
}

/// `scheme://host[:port]` of a URL (already without userinfo).
fn origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or_default()),
        None => String::new(),
    }
}

/// `host` and port of a `host:port` text.
fn server(s: &str) -> Option<(&str, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Some((host, port.parse().ok())),
        _ => Some((s, None)),
    }
}

/// The HTTP status of an `http_503: ...` error.
fn http_status_in(error: &str) -> Option<i64> {
    error.split(':').next()?.strip_prefix("http_")?.parse().ok().filter(|s| (100..600).contains(s))
}

fn decision_attrs(out: &Value, capture: bool, attributes: &mut Vec<(&'static str, Attr)>) {
    let s = |k: &str| out.get(k).and_then(Value::as_str);
    if let Some(choice) = s("choice") {
        attributes.push((DECISION_CHOICE, Attr::from(choice)));
    }
    if let Some(path) = s("path") {
        attributes.push((DECISION_PATH, Attr::from(path)));
    }
    if let Some(c) = out.get("confidence").and_then(Value::as_f64) {
        attributes.push((DECISION_CONFIDENCE, Attr::F64(c)));
    }
    attributes
        .push((DECISION_FALLBACK_USED, Attr::from(out.get("fallback_used").and_then(Value::as_bool).unwrap_or(false))));
    if let Some(reason) = s("fallback_reason") {
        attributes.push((DECISION_FALLBACK_REASON, Attr::from(reason)));
    }
    if let Some(m) = s("model_choice") {
        attributes.push((DECISION_MODEL_CHOICE, Attr::from(m)));
    }
    if capture && let Some(r) = s("rationale") {
        attributes.push((DECISION_RATIONALE, Attr::from(truncate(r))));
    }
}

/// The parts of a journaled answer, in the GenAI message shape.
fn output_parts(value: &Value) -> Value {
    let mut parts = Vec::new();
    if let Some(text) = value.get("content").and_then(Value::as_str) {
        parts.push(serde_json::json!({"type": "text", "content": text}));
    }
    for call in value.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        parts.push(serde_json::json!({
            "type": "tool_call",
            "id": call.get("id"),
            "name": call.get("name"),
            "arguments": call.get("arguments").map(redacted_arguments),
        }));
    }
    Value::Array(parts)
}

/// Names whose values never go on a span, whatever the capture setting.
fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "secret",
        "password",
        "api_key",
        "apikey",
        "api-key",
        "idempotency",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Tool-call arguments (JSON text) with secret-looking keys removed.
fn redacted_arguments(v: &Value) -> Value {
    match v.as_str().map(serde_json::from_str::<Value>) {
        Some(Ok(parsed)) => Value::String(redacted(&parsed).to_string()),
        // Not JSON: kept only as its size.
        Some(Err(_)) => Value::String(format!("[{} bytes]", v.as_str().map_or(0, str::len))),
        None => redacted(v),
    }
}

/// `v` with the values of secret-looking keys and all HTTP headers
/// removed, and URLs (a `url` key) without query and userinfo.
fn redacted(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    if secret_key(k) || k == "headers" {
                        (k.clone(), Value::String("[redacted]".into()))
                    } else if k == "url"
                        && let Some(url) = v.as_str()
                    {
                        (k.clone(), Value::String(clean_url(url)))
                    } else {
                        (k.clone(), redacted(v))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redacted).collect()),
        other => other.clone(),
    }
}

fn content(v: &Value) -> String {
    match v {
        Value::String(s) => truncate(s),
        other => truncate(&other.to_string()),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_CONTENT {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(MAX_CONTENT).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_query_fragment_and_userinfo() {
        assert_eq!(clean_url("https://u:p@example.com/a/b?token=x#f"), "https://example.com/a/b");
        assert_eq!(clean_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(clean_url("http://h/?q=1"), "http://h/");
    }

    #[test]
    fn secrets_are_redacted_from_content() {
        let v = serde_json::json!({"url": "u", "headers": {"Authorization": "Bearer x"}, "api_key": "k", "nested": [{"token": "t", "ok": 1}]});
        let r = redacted(&v);
        assert_eq!(r["headers"], "[redacted]");
        assert_eq!(r["api_key"], "[redacted]");
        assert_eq!(r["nested"][0]["token"], "[redacted]");
        assert_eq!(r["nested"][0]["ok"], 1);
        assert!(!r.to_string().contains("Bearer"));
    }

    #[test]
    fn http_status_is_read_from_the_error() {
        assert_eq!(http_status_in("http_503: HTTP 503: busy"), Some(503));
        assert_eq!(http_status_in("http_connect: refused"), None);
    }

    #[test]
    fn root_trace_ids_come_from_the_run_id() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(root_trace_id(&id.to_string()), *id.as_bytes());
        assert_ne!(root_trace_id("not-a-uuid"), [0; 16]);
    }
}
