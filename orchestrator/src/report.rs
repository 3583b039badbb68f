//! Human summaries of runs, derived from the journal.

use std::collections::BTreeMap;

use serde::Serialize;
use switchyard_steps::StepError;

use crate::journal::Event;
use crate::store::JournalEntry;

/// What happened to one step, folded from the journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepSummary {
    pub id: String,
    pub status: String,
    pub attempts: u32,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Steps in the order they first appear in the journal.
pub fn steps(journal: &[JournalEntry]) -> Vec<StepSummary> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, StepSummary> = BTreeMap::new();
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
    for e in journal {
        match &e.event {
            Event::StepStarted { step, attempt } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "running".into();
                s.attempts = *attempt;
                s.started_at.get_or_insert(e.at);
            }
            Event::StepSucceeded { step, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "succeeded".into();
                s.ended_at = Some(e.at);
                s.error = None;
            }
            Event::StepFailed { step, error, retry_at, continued, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.error = Some(error.clone());
                s.ended_at = Some(e.at);
                s.status = match (retry_at, continued) {
                    (Some(_), _) => "retrying".into(),
                    (None, true) => "failed (continued)".into(),
                    (None, false) => "failed".into(),
                };
            }
            Event::StepSuspended { step, until, .. } => {
                let s = entry(&mut by_id, &mut order, step);
                s.status = "waiting".into();
                s.note = Some(format!("until {}", format_ms(*until)));
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

/// Unix milliseconds as RFC 3339 (UTC).
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One line per step, for terminals.
pub fn render(steps: &[StepSummary]) -> String {
    let width = steps.iter().map(|s| s.id.len()).max().unwrap_or(4).max(4);
    let mut out = String::new();
    for s in steps {
        let took = match (s.started_at, s.ended_at) {
            (Some(a), Some(b)) => format!("{} ms", b - a),
            _ => String::new(),
        };
        let attempts = match s.attempts {
            0 => String::new(),
            1 => "1 attempt".into(),
            n => format!("{n} attempts"),
        };
        let detail = match (&s.error, &s.note) {
            (Some(e), _) => format!("  {}: {}", e.code, e.message),
            (None, Some(n)) => format!("  ({n})"),
            _ => String::new(),
        };
        out.push_str(&format!("  {:<width$}  {:<18} {:<11} {:>8}{detail}\n", s.id, s.status, attempts, took));
    }
    out
}
