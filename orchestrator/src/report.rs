//! Human summaries of runs, derived from the journal, and the text that is
//! safe to print: run data (error messages, notes, workflow names, inputs
//! and outputs) goes through [`printable`] or [`json`] before it reaches a
//! terminal, so it cannot clear the screen or fake a status line.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;
use switchyard_steps::StepError;

use crate::journal::{Event, RunStatus};
use crate::store::{JournalEntry, RunRecord};

/// What happened to one step, folded from the journal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepSummary {
    pub id: String,
    pub status: String,
    pub attempts: u32,
    /// When the first attempt started and the last one ended (unix ms).
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// The time the step's attempts took, summed (see [`steps`]); `None`
    /// until an attempt ends.
    pub duration_ms: Option<i64>,
    pub error: Option<StepError>,
    pub note: Option<String>,
    /// The step's model calls (every journaled one, of every attempt).
    pub llm: Option<LlmUse>,
    /// What a `decide` step decided.
    pub decision: Option<Decision>,
    /// The run its result was copied from (`runs rerun`; status `reused`).
    pub reused_from: Option<String>,
    /// Each attempt, in order.
    pub attempt_list: Vec<AttemptSummary>,
}

/// One attempt of a step.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct AttemptSummary {
    pub attempt: u32,
    pub started_at: i64,
    /// `None` while it runs (or if its process died: then it is
    /// `interrupted`, ended by the next attempt's start).
    pub ended_at: Option<i64>,
    /// `running`, `waiting`, `succeeded`, `failed`, `retrying`,
    /// `continued`, `interrupted`.
    pub status: String,
    pub error: Option<StepError>,
}

/// Model calls of a step, from its journaled `llm_call` operations. Calls,
/// tokens and cost are what this run paid for; the answers of a step reused
/// from an earlier run (`runs rerun`) are counted apart, as `reused`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LlmUse {
    pub calls: u32,
    /// Calls that failed and were waited out (429, 5xx, timeouts).
    pub unavailable: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The last model that answered.
    pub model: String,
    /// In the currency of the price table; `null` without a price for the
    /// model (see `SWITCHYARD_LLM_PRICES`).
    pub cost: Option<f64>,
    /// Calls whose answers were reused from an earlier run (`runs rerun`):
    /// not sent again, not paid again.
    #[serde(skip_serializing_if = "is_zero")]
    pub reused: u32,
    /// The tokens of the reused calls (not in `input_tokens`, `output_tokens`).
    #[serde(skip_serializing_if = "is_zero")]
    pub reused_input_tokens: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub reused_output_tokens: u64,
}

fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

impl LlmUse {
    /// Adds one journaled `llm_call` operation; `reused`: it came with a
    /// step reused from an earlier run.
    /// Adds the `llm_call` op `value`.
    fn add(&mut self, value: &Value, reused: bool) {
        let Some(usage) = switchyard_steps::llm::usage_of_op(switchyard_steps::llm::CALL_OP, value) else {
            // A wait a reused step went through was not this run's.
            if !reused {
                self.unavailable += 1;
            }
            return;
        };
        let (input, output) = (usage.input_tokens, usage.output_tokens);
        if reused {
            self.reused += 1;
            self.reused_input_tokens += input;
            self.reused_output_tokens += output;
        } else {
            self.calls += 1;
            self.input_tokens += input;
            self.output_tokens += output;
        }
        if let Some(model) = value.get("model").and_then(Value::as_str) {
            self.model = model.to_owned();
        }
    }
}

/// The output of a `decide` step, as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub choice: String,
    pub rationale: Option<String>,
    pub confidence: Option<f64>,
    pub fallback_reason: Option<String>,
}

impl Decision {
    fn from_output(output: &Value) -> Option<Self> {
        // A decision's output: `choice` and `fallback_used`.
        let choice = output.get("choice")?.as_str()?.to_owned();
        output.get("fallback_used")?.as_bool()?;
        Some(Self {
            choice,
            rationale: output.get("rationale").and_then(Value::as_str).map(str::to_owned),
            confidence: output.get("confidence").and_then(Value::as_f64),
            fallback_reason: output.get("fallback_reason").and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// Prices per million tokens by model, from `SWITCHYARD_LLM_PRICES`:
/// `{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct Prices(BTreeMap<String, Price>);

#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

impl Prices {
    /// Parses the price table; the error names the place.
    pub fn parse(text: &str) -> Result<Self, String> {
        let prices: Self = serde_json::from_str(text).map_err(|e| format!("SWITCHYARD_LLM_PRICES: {e}"))?;
        for (model, p) in &prices.0 {
            if !(p.input.is_finite() && p.output.is_finite() && p.input >= 0.0 && p.output >= 0.0) {
                return Err(format!("SWITCHYARD_LLM_PRICES: {model}: prices are numbers of at least 0"));
            }
        }
        Ok(prices)
    }

    /// What `usage` cost on `model`, if it has a price.
    pub fn cost(&self, model: &str, input_tokens: u64, output_tokens: u64) -> Option<f64> {
        let p = self.0.get(model)?;
        Some((input_tokens as f64 * p.input + output_tokens as f64 * p.output) / 1_000_000.0)
    }

    /// Fills in the cost of each step's model calls.
    pub fn apply(&self, steps: &mut [StepSummary]) {
        for llm in steps.iter_mut().filter_map(|s| s.llm.as_mut()) {
            llm.cost = self.cost(&llm.model, llm.input_tokens, llm.output_tokens);
        }
    }
}

/// Tokens of the reused model calls over all steps: `(input, output)`, if
/// any call was reused.
pub fn llm_reused_totals(steps: &[StepSummary]) -> Option<(u64, u64)> {
    let uses: Vec<&LlmUse> = steps.iter().filter_map(|s| s.llm.as_ref()).filter(|u| u.reused > 0).collect();
    if uses.is_empty() {
        return None;
    }
    Some((uses.iter().map(|u| u.reused_input_tokens).sum(), uses.iter().map(|u| u.reused_output_tokens).sum()))
}

/// Tokens and cost over all steps: `(input, output, cost)`, what this run
/// paid for (reused calls are not in it); the cost is `None` if any step
/// with calls has no price.
pub fn llm_totals(steps: &[StepSummary]) -> Option<(u64, u64, Option<f64>)> {
    let uses: Vec<&LlmUse> = steps.iter().filter_map(|s| s.llm.as_ref()).collect();
    if uses.is_empty() {
        return None;
    }
    let input = uses.iter().map(|u| u.input_tokens).sum();
    let output = uses.iter().map(|u| u.output_tokens).sum();
    // A step whose calls were all reused cost this run nothing, priced or not.
    let paid = uses.iter().filter(|u| u.calls > 0 || u.unavailable > 0 || u.reused == 0);
    let cost = paid.into_iter().try_fold(0.0, |sum, u| u.cost.map(|c| sum + c));
    Some((input, output, cost))
}

/// Steps in the order they first appear in the journal.
///
/// A step's duration is the sum, over its attempts, of the time from the
/// attempt's `step_started` to its `step_succeeded` or `step_failed`. An
/// attempt that never ended (its process died) counts zero, so the time the
/// process was down is not counted, nor is the backoff between attempts. An
/// attempt that suspended (a `sleep`) is measured from its start to its end,
/// so its wait is counted.
pub fn steps(journal: &[JournalEntry]) -> Vec<StepSummary> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, StepSummary> = BTreeMap::new();
    // When each step's current attempt started, while it has not ended.
    let mut open: BTreeMap<String, i64> = BTreeMap::new();
    fn entry<'m>(
        by_id: &'m mut BTreeMap<String, StepSummary>,
        order: &mut Vec<String>,
        id: &str,
    ) -> &'m mut StepSummary {
        by_id.entry(id.to_owned()).or_insert_with(|| {
            order.push(id.to_owned());
            StepSummary { id: id.to_owned(), ..Default::default() }
        })
    }
    fn end(s: &mut StepSummary, open: &mut BTreeMap<String, i64>, at: i64) {
        s.ended_at = Some(at);
        if let Some(start) = open.remove(&s.id) {
            let took = at.saturating_sub(start).max(0);
            s.duration_ms = Some(s.duration_ms.unwrap_or(0).saturating_add(took));
        }
    }
    for e in journal {
        match &e.event {
            Event::StepStarted { step, attempt } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "running".into();
                s.attempts = *attempt;
                s.started_at.get_or_insert(e.at);
                // An earlier attempt still open was interrupted: it counts 0.
                open.insert(step.clone(), e.at);
                if let Some(last) = s.attempt_list.last_mut()
                    && last.ended_at.is_none()
                {
                    last.status = "interrupted".into();
                }
                s.attempt_list.push(AttemptSummary {
                    attempt: *attempt,
                    started_at: e.at,
                    ended_at: None,
                    status: "running".into(),
                    error: None,
                });
            }
            Event::StepSucceeded { step, output, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "succeeded".into();
                s.error = None;
                s.decision = Decision::from_output(output);
                end(s, &mut open, e.at);
                end_attempt(s, e.at, "succeeded", None);
            }
            Event::StepOp { step, name, value, .. } if name == switchyard_steps::llm::CALL_OP => {
                let s = entry(&mut by_id, &mut order, step);
                s.llm.get_or_insert_with(LlmUse::default).add(value, false);
            }
            Event::StepReused { step, from_run, output, ops } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "reused".into();
                s.note = Some(format!("from {from_run}"));
                s.reused_from = Some(from_run.clone());
                s.error = None;
                s.decision = Decision::from_output(output);
                s.ended_at = Some(e.at);
                for op in ops.iter().filter(|op| op.name == switchyard_steps::llm::CALL_OP) {
                    s.llm.get_or_insert_with(LlmUse::default).add(&op.value, true);
                }
            }
            Event::StepFailed { step, error, retry_at, continued, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.error = Some(error.clone());
                s.status = match (retry_at, continued) {
                    (Some(_), _) => "retrying".into(),
                    (None, true) => "failed (continued)".into(),
                    (None, false) => "failed".into(),
                };
                end(s, &mut open, e.at);
                let status = match (retry_at, continued) {
                    (Some(_), _) => "retrying",
                    (None, true) => "continued",
                    (None, false) => "failed",
                };
                end_attempt(s, e.at, status, Some(error.clone()));
            }
            Event::StepSuspended { step, until, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "waiting".into();
                s.note = Some(format!("until {}", format_ms(*until)));
                if let Some(a) = s.attempt_list.last_mut() {
                    a.status = "waiting".into();
                }
            }
            Event::StepWaiting { step, signal, until, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "waiting".into();
                if let Some(a) = s.attempt_list.last_mut() {
                    a.status = "waiting".into();
                }
                let what = match signal {
                    Some(name) => format!("for signal {name}"),
                    None => "for its child runs".to_owned(),
                };
                s.note = Some(match until {
                    Some(at) => format!("{what} until {}", format_ms(*at)),
                    None => what,
                });
            }
            Event::StepSkipped { step, reason } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "skipped".into();
                s.note = Some(reason.clone());
            }
            _ => {}
        }
    }
    order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
}

fn end_attempt(s: &mut StepSummary, at: i64, status: &str, error: Option<StepError>) {
    if let Some(a) = s.attempt_list.last_mut()
        && a.ended_at.is_none()
    {
        a.ended_at = Some(at);
        a.status = status.to_owned();
        a.error = error;
    }
}

/// A child run in a timeline: under the step that started it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildTimeline {
    pub record: RunRecord,
    /// Its id below the parent's (`fan/0`).
    pub name: String,
    /// The parent's step it belongs to.
    pub step: String,
    pub steps: Vec<StepSummary>,
}

impl ChildTimeline {
    /// Child run `record` of run `parent`, with its journal.
    pub fn new(parent: &str, record: RunRecord, journal: &[JournalEntry]) -> Self {
        let rest = record.id.strip_prefix(parent).and_then(|r| r.strip_prefix('/')).unwrap_or(&record.id);
        let step = rest.split('/').next().unwrap_or_default().to_owned();
        let name = rest.to_owned();
        Self { record, name, step, steps: steps(journal) }
    }
}

/// Width of a timeline bar, in characters.
const BAR: usize = 24;

/// The run's steps as a timeline: each step's line (status, attempts,
/// time, error or note; the decision, model tokens and cost below it),
/// then one line per attempt with its start offset from `origin` (the
/// run's start), its duration and a bar placing it within `origin..end`,
/// and the step's child runs nested under it.
pub fn render_timeline(steps: &[StepSummary], origin: i64, end: i64, children: &[ChildTimeline]) -> String {
    let mut out = String::new();
    timeline_into(&mut out, steps, origin, end, children, "  ");
    totals_into(&mut out, steps);
    out
}

fn timeline_into(
    out: &mut String,
    steps: &[StepSummary],
    origin: i64,
    end: i64,
    children: &[ChildTimeline],
    indent: &str,
) {
    let span = (end - origin).max(1);
    let width = id_width(steps);
    for s in steps {
        let table = render_step(s, indent, width);
        out.push_str(&table);
        let pad = format!("{indent}    ");
        for a in &s.attempt_list {
            let offset = a.started_at - origin;
            let took = a.ended_at.map(|e| format!("{} ms", (e - a.started_at).max(0))).unwrap_or_else(|| "-".into());
            let from = ((offset.max(0) as f64 / span as f64) * BAR as f64).floor() as usize;
            let to = ((a.ended_at.unwrap_or(end) - origin).max(0) as f64 / span as f64 * BAR as f64).ceil() as usize;
            let (from, to) = (from.min(BAR - 1), to.clamp(from.min(BAR - 1) + 1, BAR));
            let bar: String = (0..BAR).map(|i| if i >= from && i < to { '█' } else { '·' }).collect();
            let error = a.error.as_ref().map(|e| format!("  {}: {}", printable(&e.code), printable(&e.message)));
            let _ = writeln!(
                out,
                "{pad}#{:<3} +{:<9} {took:>9}  |{bar}|  {}{}",
                a.attempt,
                format!("{offset} ms"),
                printable(&a.status),
                error.unwrap_or_default()
            );
        }
        let mine: Vec<&ChildTimeline> = children.iter().filter(|c| c.step == s.id).collect();
        for c in mine {
            let took = c.record.finished_at.map(|f| format!(", {} ms", (f - c.record.created_at).max(0)));
            let _ = writeln!(
                out,
                "{pad}child {} ({} v{}): {}{}",
                printable(&c.name),
                printable(&c.record.workflow),
                c.record.version,
                c.record.status,
                took.unwrap_or_default()
            );
            timeline_into(out, &c.steps, origin, end, &[], &format!("{pad}  "));
        }
    }
}

/// Unix milliseconds as RFC 3339 text in UTC, `2025-01-31T08:00:00.000Z`.
/// Total: a year past 9999 is written with a sign (`+10000-01-01T...`, as
/// ISO 8601 extends it) and so is a year before 0000.
pub fn format_ms(ms: i64) -> String {
    const DAY: i64 = 86_400_000;
    let (days, rest) = (ms.div_euclid(DAY), ms.rem_euclid(DAY));
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    let year = match year {
        0..=9999 => format!("{year:04}"),
        10_000.. => format!("+{year}"),
        _ => format!("-{:04}", year.unsigned_abs()),
    };
    format!("{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`). No overflow for any day an `i64` of
/// milliseconds can name.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `text` as one line that cannot steer a terminal: control characters (C0
/// including newline and tab, DEL, C1) and bidirectional overrides
/// (U+202A-U+202E, U+2066-U+2069) are written as escapes (`\n`, `\t`, `\r`,
/// `\u{1b}`); everything else is kept as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// [`printable`] for text of several lines: newlines are kept.
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    let escaped = |c: char| unsafe_char(c) && !(keep_newlines && c == '\n');
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if !escaped(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

/// Characters a terminal may act on: C0, DEL, C1 and bidi overrides.
fn unsafe_char(c: char) -> bool {
    c.is_control() || is_bidi_override(c)
}

fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Compact JSON text of `value` that is safe on a terminal: serde_json
/// escapes C0 controls; DEL, C1 controls and bidi overrides, which it leaves
/// raw, are written as `\uXXXX` too. The text parses back to the same value.
pub fn json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    serde_json::to_string(value).map(escape_json)
}

/// [`json`], indented.
pub fn json_pretty<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    serde_json::to_string_pretty(value).map(escape_json)
}

/// Outside strings, serialized JSON is ASCII without controls other than
/// its layout whitespace, so every character matched here is inside a
/// string, where `\uXXXX` stands for it. All of them are in the BMP.
fn escape_json(text: String) -> String {
    let escaped = |c: char| c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || is_bidi_override(c);
    if !text.chars().any(escaped) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// One line per step, for terminals.
pub fn render(steps: &[StepSummary]) -> String {
    let mut out = String::new();
    let width = id_width(steps);
    for s in steps {
        out.push_str(&render_step(s, "  ", width));
    }
    totals_into(&mut out, steps);
    out
}

/// The run's model tokens and cost, paid and reused.
fn totals_into(out: &mut String, steps: &[StepSummary]) {
    if let Some((input, output, cost)) = llm_totals(steps) {
        let cost = cost.map(|c| format!(", cost {c:.6}")).unwrap_or_default();
        let _ = writeln!(out, "  model tokens: {input} in + {output} out{cost}");
    }
    if let Some((input, output)) = llm_reused_totals(steps) {
        let _ = writeln!(out, "  reused model tokens (not paid again): {input} in + {output} out");
    }
}

fn id_width(steps: &[StepSummary]) -> usize {
    steps.iter().map(|s| printable(&s.id).chars().count()).max().unwrap_or(4).max(4)
}

/// A step's line, and its decision and model use below it.
fn render_step(s: &StepSummary, indent: &str, width: usize) -> String {
    let id = printable(&s.id);
    let mut out = String::new();
    {
        let took = s.duration_ms.map(|ms| format!("{ms} ms")).unwrap_or_default();
        let attempts = match s.attempts {
            0 => String::new(),
            1 => "1 attempt".into(),
            n => format!("{n} attempts"),
        };
        let detail = match (&s.error, &s.note) {
            (Some(e), _) => format!("  {}: {}", printable(&e.code), printable(&e.message)),
            (None, Some(n)) => format!("  ({})", printable(n)),
            _ => String::new(),
        };
        let status = printable(&s.status);
        let _ = writeln!(out, "{indent}{id:<width$}  {status:<18} {attempts:<11} {took:>8}{detail}");
        let pad = format!("{indent}  ");
        if let Some(d) = &s.decision {
            let confidence = d.confidence.map(|c| format!(" (confidence {c:.2})")).unwrap_or_default();
            let fallback =
                d.fallback_reason.as_deref().map(|r| format!(" [fallback: {}]", printable(r))).unwrap_or_default();
            let _ = writeln!(out, "{pad}decided {}{confidence}{fallback}", printable(&d.choice));
            if let Some(r) = &d.rationale {
                let _ = writeln!(out, "{pad}rationale: {}", printable(r));
            }
        }
        if let Some(llm) = &s.llm {
            let mut parts = Vec::new();
            if llm.calls > 0 || llm.unavailable > 0 || llm.reused == 0 {
                let mut paid =
                    format!("{}, {} in + {} out tokens", calls(llm.calls), llm.input_tokens, llm.output_tokens);
                if let Some(cost) = llm.cost {
                    let _ = write!(paid, ", cost {cost:.6}");
                }
                if llm.unavailable > 0 {
                    let _ = write!(paid, ", {} waited out", llm.unavailable);
                }
                parts.push(paid);
            }
            if llm.reused > 0 {
                parts.push(format!(
                    "{} reused, {} in + {} out tokens not paid again",
                    calls(llm.reused),
                    llm.reused_input_tokens,
                    llm.reused_output_tokens
                ));
            }
            let mut line = parts.join("; ");
            if !llm.model.is_empty() {
                line = format!("{}: {line}", printable(&llm.model));
            }
            let _ = writeln!(out, "{pad}{line}");
        }
    }
    out
}

fn calls(n: u32) -> String {
    if n == 1 { "1 model call".to_owned() } else { format!("{n} model calls") }
}

// Machine output: `runs list --json` and `runs show --json`. Field names are
// a contract (documented in README.md). Every time is given twice: `<name>`
// as text (see [`format_ms`]) and `<name>_ms` as unix milliseconds; both are
// `null` when absent.

/// One element of `runs list --json`.
#[derive(Debug, Serialize)]
pub struct RunListItem<'a> {
    pub id: &'a str,
    pub workflow: &'a str,
    pub version: u32,
    pub status: RunStatus,
    pub created_at: String,
    pub created_at_ms: i64,
    pub updated_at: String,
    pub updated_at_ms: i64,
    pub finished_at: Option<String>,
    pub finished_at_ms: Option<i64>,
}

impl<'a> From<&'a RunRecord> for RunListItem<'a> {
    fn from(r: &'a RunRecord) -> Self {
        RunListItem {
            id: &r.id,
            workflow: &r.workflow,
            version: r.version,
            status: r.status,
            created_at: format_ms(r.created_at),
            created_at_ms: r.created_at,
            updated_at: format_ms(r.updated_at),
            updated_at_ms: r.updated_at,
            finished_at: r.finished_at.map(format_ms),
            finished_at_ms: r.finished_at,
        }
    }
}

/// `runs show --json`.
#[derive(Debug, Serialize)]
pub struct RunDetail<'a> {
    pub id: &'a str,
    pub parent_id: Option<&'a str>,
    pub root_id: &'a str,
    pub workflow: &'a str,
    pub version: u32,
    pub status: RunStatus,
    pub input: &'a Value,
    pub output: Option<&'a Value>,
    pub error: Option<&'a StepError>,
    pub cancel_requested: bool,
    pub created_at: String,
    pub created_at_ms: i64,
    pub updated_at: String,
    pub updated_at_ms: i64,
    pub finished_at: Option<String>,
    pub finished_at_ms: Option<i64>,
    /// When a `waiting` run wakes; `null` for any other status.
    pub wake_at: Option<String>,
    pub wake_at_ms: Option<i64>,
    /// The run's OpenTelemetry trace id (hex): the caller's, when the run
    /// was started with a `traceparent`, else the run id's UUID.
    pub trace_id: String,
    pub steps: Vec<StepDetail<'a>>,
    pub children: Vec<ChildItem<'a>>,
    /// Only with `--journal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<Vec<JournalItem<'a>>>,
}

/// One step of [`RunDetail`].
#[derive(Debug, Serialize)]
pub struct StepDetail<'a> {
    pub id: &'a str,
    pub status: &'a str,
    pub attempts: u32,
    pub duration_ms: Option<i64>,
    pub started_at: Option<String>,
    pub started_at_ms: Option<i64>,
    pub ended_at: Option<String>,
    pub ended_at_ms: Option<i64>,
    pub error: Option<&'a StepError>,
    pub note: Option<&'a str>,
    pub llm: Option<&'a LlmUse>,
    pub decision: Option<&'a Decision>,
    /// The run a `reused` step's result was copied from.
    pub reused_from: Option<&'a str>,
    /// Each attempt, with its start as an offset from the run's start.
    pub timeline: Vec<AttemptDetail<'a>>,
}

/// One attempt of [`StepDetail`].
#[derive(Debug, Serialize)]
pub struct AttemptDetail<'a> {
    pub attempt: u32,
    pub status: &'a str,
    pub start_offset_ms: i64,
    pub duration_ms: Option<i64>,
    pub started_at: String,
    pub started_at_ms: i64,
    pub ended_at: Option<String>,
    pub ended_at_ms: Option<i64>,
    pub error: Option<&'a StepError>,
}

/// One child run of [`RunDetail`]; `steps` only for the children shown
/// in full (see `runs show`).
#[derive(Debug, Serialize)]
pub struct ChildItem<'a> {
    pub id: &'a str,
    pub workflow: &'a str,
    pub status: RunStatus,
    /// The parent's step that started it.
    pub step: Option<&'a str>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub steps: Option<Vec<StepDetail<'a>>>,
}

/// One journal entry of [`RunDetail`]: the event as it is stored.
#[derive(Debug, Serialize)]
pub struct JournalItem<'a> {
    pub seq: i64,
    pub at: String,
    pub at_ms: i64,
    pub event: &'a Event,
}

/// The `runs show --json` object of run `r`.
pub fn run_detail<'a>(
    r: &'a RunRecord,
    steps: &'a [StepSummary],
    children: &'a [RunRecord],
    shown: &'a [ChildTimeline],
    journal: Option<&'a [JournalEntry]>,
    trace_id: String,
) -> RunDetail<'a> {
    let wake_at = r.wake_at.filter(|_| r.status == RunStatus::Waiting);
    let origin = r.created_at;
    RunDetail {
        id: &r.id,
        parent_id: r.parent_id.as_deref(),
        root_id: &r.root_id,
        workflow: &r.workflow,
        version: r.version,
        status: r.status,
        input: &r.input,
        output: r.output.as_ref(),
        error: r.error.as_ref(),
        cancel_requested: r.cancel_requested,
        created_at: format_ms(r.created_at),
        created_at_ms: r.created_at,
        updated_at: format_ms(r.updated_at),
        updated_at_ms: r.updated_at,
        finished_at: r.finished_at.map(format_ms),
        finished_at_ms: r.finished_at,
        wake_at: wake_at.map(format_ms),
        wake_at_ms: wake_at,
        trace_id,
        steps: step_details(steps, origin),
        children: children
            .iter()
            .map(|c| {
                let full = shown.iter().find(|t| t.record.id == c.id);
                ChildItem {
                    id: &c.id,
                    workflow: &c.workflow,
                    status: c.status,
                    step: full.map(|t| t.step.as_str()),
                    created_at_ms: c.created_at,
                    finished_at_ms: c.finished_at,
                    steps: full.map(|t| step_details(&t.steps, origin)),
                }
            })
            .collect(),
        journal: journal.map(|entries| {
            entries
                .iter()
                .map(|e| JournalItem { seq: e.seq, at: format_ms(e.at), at_ms: e.at, event: &e.event })
                .collect()
        }),
    }
}

fn step_details(steps: &[StepSummary], origin: i64) -> Vec<StepDetail<'_>> {
    steps
        .iter()
        .map(|s| StepDetail {
            id: &s.id,
            status: &s.status,
            attempts: s.attempts,
            duration_ms: s.duration_ms,
            started_at: s.started_at.map(format_ms),
            started_at_ms: s.started_at,
            ended_at: s.ended_at.map(format_ms),
            ended_at_ms: s.ended_at,
            error: s.error.as_ref(),
            note: s.note.as_deref(),
            llm: s.llm.as_ref(),
            decision: s.decision.as_ref(),
            reused_from: s.reused_from.as_deref(),
            timeline: s
                .attempt_list
                .iter()
                .map(|a| AttemptDetail {
                    attempt: a.attempt,
                    status: &a.status,
                    start_offset_ms: a.started_at - origin,
                    duration_ms: a.ended_at.map(|e| (e - a.started_at).max(0)),
                    started_at: format_ms(a.started_at),
                    started_at_ms: a.started_at,
                    ended_at: a.ended_at.map(format_ms),
                    ended_at_ms: a.ended_at,
                    error: a.error.as_ref(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn format_ms_is_total() {
        let rfc = |ms: u64| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        };
        for ms in [0, 1, 999, 86_399_999, 951_782_400_000, 1_700_000_000_123, 4_107_542_400_000, 253_402_300_799_999] {
            assert_eq!(format_ms(ms as i64), rfc(ms), "{ms}");
        }
        assert_eq!(format_ms(253_402_300_800_000), "+10000-01-01T00:00:00.000Z");
        assert_eq!(format_ms(i64::MAX), "+292278994-08-17T07:12:55.807Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_ms(-62_167_219_200_001), "-0001-12-31T23:59:59.999Z");
        assert!(format_ms(i64::MIN).starts_with("-292275055-"), "{}", format_ms(i64::MIN));
        // `sleep: {duration: 8000y}` parks a run this far ahead.
        assert!(format_ms(1_700_000_000_000 + 8000 * 31_557_600_000).starts_with("+1002"));
    }

    #[test]
    fn printable_escapes_what_a_terminal_acts_on() {
        assert!(matches!(printable("plain text, ünïcode ✓"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[2Jb\u{9b}c\u{7f}"), "a\\u{1b}[2Jb\\u{9b}c\\u{7f}");
        assert_eq!(printable("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(printable("\u{202e}evil\u{2066}"), "\\u{202e}evil\\u{2066}");
        assert_eq!(printable_lines("one\n\u{1b}two"), "one\n\\u{1b}two");
    }

    #[test]
    fn json_escapes_c1_and_bidi_and_stays_the_same_value() {
        let value = json!({"m": "a\u{1b}b\u{9b}c\u{202e}d\u{7f}\u{85}", "k\u{9b}": [1, "ok"]});
        for text in [json(&value).unwrap(), json_pretty(&value).unwrap()] {
            assert!(!text.chars().any(|c| c.is_control() && c != '\n') && !text.contains('\u{202e}'), "{text}");
            assert!(text.contains("\\u009b") && text.contains("\\u202e") && text.contains("\\u001b"), "{text}");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
        }
    }

    fn at(at: i64, event: Event) -> JournalEntry {
        JournalEntry { seq: 0, at, event }
    }

    fn started(step: &str, attempt: u32) -> Event {
        Event::StepStarted { step: step.into(), attempt }
    }

    #[test]
    fn duration_sums_attempts_and_leaves_out_the_time_the_process_was_down() {
        let hour = 3_600_000;
        let error = StepError::retryable("http_503", "unavailable");
        let journal = [
            // `crashed`: attempt 1 was in flight when the process died; a
            // worker took the run over an hour later.
            at(1_000, started("crashed", 1)),
            at(1_000 + hour, started("crashed", 2)),
            at(1_250 + hour, Event::StepSucceeded { step: "crashed".into(), attempt: 2, output: json!(1) }),
            // `retried`: two attempts of 100 and 30 ms with a backoff between.
            at(2_000, started("retried", 1)),
            at(
                2_100,
                Event::StepFailed {
                    step: "retried".into(),
                    attempt: 1,
                    error: error.clone(),
                    retry_at: Some(60_000),
                    continued: false,
                },
            ),
            at(60_000, started("retried", 2)),
            at(60_030, Event::StepSucceeded { step: "retried".into(), attempt: 2, output: json!(2) }),
            // `napping`: a sleep counts from its start to its end.
            at(5_000, started("napping", 1)),
            at(5_001, Event::StepSuspended { step: "napping".into(), attempt: 1, until: 7_000 }),
            at(7_002, Event::StepSucceeded { step: "napping".into(), attempt: 1, output: json!(3) }),
            // `open`: started, never ended.
            at(8_000, started("open", 1)),
            at(9_000, Event::StepSkipped { step: "skipped".into(), reason: "when was false".into() }),
        ];
        let steps = steps(&journal);
        let took: Vec<(&str, Option<i64>, u32)> =
            steps.iter().map(|s| (s.id.as_str(), s.duration_ms, s.attempts)).collect();
        assert_eq!(
            took,
            [
                ("crashed", Some(250), 2),
                ("retried", Some(130), 2),
                ("napping", Some(2_002), 1),
                ("open", None, 1),
                ("skipped", None, 0)
            ]
        );
        assert_eq!((steps[0].started_at, steps[0].ended_at), (Some(1_000), Some(1_250 + hour)));
        let table = render(&steps);
        assert!(table.contains("250 ms") && !table.contains("3600250"), "{table}");
    }

    #[test]
    fn a_reused_step_shows_its_calls_as_not_paid_again() {
        let call = |input: u64, output: u64| json!({"outcome": "answered", "model": "m1", "usage": {"input_tokens": input, "output_tokens": output}});
        let reused = crate::journal::ReusedOp { index: 0, name: "llm_call".into(), value: call(12, 8) };
        let journal = [
            at(1, Event::StepReused { step: "a".into(), from_run: "r0".into(), output: json!({}), ops: vec![reused] }),
            at(2, started("b", 1)),
            at(
                3,
                Event::StepOp {
                    step: "b".into(),
                    attempt: 1,
                    index: 0,
                    name: "llm_call".into(),
                    value: call(5, 2),
                    at: None,
                },
            ),
            at(4, Event::StepSucceeded { step: "b".into(), attempt: 1, output: json!({}) }),
        ];
        let mut steps = steps(&journal);
        assert_eq!((steps[0].status.as_str(), steps[0].note.as_deref()), ("reused", Some("from r0")));
        assert_eq!(steps[0].reused_from.as_deref(), Some("r0"));
        let a = steps[0].llm.clone().unwrap();
        assert_eq!(
            (a.calls, a.input_tokens, a.reused, a.reused_input_tokens, a.reused_output_tokens),
            (0, 0, 1, 12, 8)
        );
        // Only b's tokens were paid for by this run; a's price does not matter.
        Prices::parse(r#"{"m1": {"input": 1000000, "output": 0}}"#).unwrap().apply(&mut steps[1..]);
        assert_eq!(llm_totals(&steps), Some((5, 2, Some(5.0))));
        assert_eq!(llm_reused_totals(&steps), Some((12, 8)));
        let table = render(&steps);
        assert!(table.contains("m1: 1 model call reused, 12 in + 8 out tokens not paid again"), "{table}");
        assert!(table.contains("m1: 1 model call, 5 in + 2 out tokens"), "{table}");
        assert!(table.contains("model tokens: 5 in + 2 out, cost 5.000000"), "{table}");
        assert!(table.contains("reused model tokens (not paid again): 12 in + 8 out"), "{table}");
        assert!(table.contains("reused") && table.contains("(from r0)"), "{table}");
    }
}
