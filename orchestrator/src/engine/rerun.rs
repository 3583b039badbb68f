//! `runs rerun`: a new run with the input of a finished one, in which the
//! steps before the chosen step that are unchanged are not run again: their
//! results, model answers included, are copied from the original journal as
//! `step_reused` events, written with the new run's `run_started`.

use std::collections::HashMap;

use fixedbitset::FixedBitSet;
use serde_json::Value;

use super::{Engine, Error, Result};
use crate::journal::{Event, ReusedOp};
use crate::store::JournalEntry;
use crate::workflow::{Definition, Workflow};

impl Engine {
    /// Starts a new root run of `def` (default: the definition `from_run`
    /// ran) with `from_run`'s input, re-running step `from_step` and every
    /// step after it. Any other step that succeeded in `from_run` with the
    /// same fingerprint, and whose needs are all reused too, is reused: its
    /// result is copied, not computed again. Returns the new run's id once
    /// its start is durable; the run is driven like a submitted one.
    pub async fn rerun(&self, from_run: &str, from_step: &str, def: Option<&Definition>) -> Result<String> {
        let inner = &self.inner;
        let record = inner.store.run(from_run).await?.ok_or_else(|| Error::NotFound(from_run.to_owned()))?;
        if record.parent_id.is_some() {
            return Err(Error::Conflict(format!("{from_run} is a child run; re-run its root run {}", record.root_id)));
        }
        if !record.status.is_finished() {
            return Err(Error::Conflict(format!("run {from_run} is still {}", record.status)));
        }
        let original = inner.definition(&record.definition).await?;
        let def = def.unwrap_or(&original);
        let Some(from) = def.workflow.step_index(from_step) else {
            let known: Vec<&str> = def.workflow.step_ids().collect();
            return Err(Error::InvalidInput(vec![format!(
                "no step {from_step:?} to re-run from in workflow {:?} (its steps: {})",
                def.workflow.name(),
                known.join(", ")
            )]));
        };
        let journal = inner.store.journal(from_run).await?;
        let reused = reused_steps(&original.workflow, &journal, &def.workflow, from, from_run);
        Ok(self.create_run(def, record.input.clone(), None, reused, None).await?.id)
    }
}

/// The `step_reused` events of a re-run of `new` from step `from`, in
/// topological order. A step is reused iff it is neither `from` nor
/// downstream of it, it succeeded in the original run (or was reused there),
/// its fingerprint is the one it had in `original`, and every step it needs
/// is reused too: then its inputs are the same, so its result would be.
pub(crate) fn reused_steps(
    original: &Workflow,
    journal: &[JournalEntry],
    new: &Workflow,
    from: usize,
    from_run: &str,
) -> Vec<Event> {
    let mut done = successes(journal);
    let mut reused = FixedBitSet::with_capacity(new.steps.len());
    let mut events = Vec::new();
    for &i in &new.order {
        let step = &new.steps[i];
        if i == from || step.upstream.contains(from) {
            continue;
        }
        let unchanged = original.step_fingerprint(&step.id) == Some(step.fingerprint.as_str());
        if !unchanged || !step.needs.iter().all(|n| reused.contains(n.step)) {
            continue;
        }
        let Some((output, ops)) = done.remove(step.id.as_str()) else { continue };
        reused.insert(i);
        events.push(Event::StepReused { step: step.id.clone(), from_run: from_run.to_owned(), output, ops });
    }
    events
}

/// The steps that succeeded in a journal: output, and the sub-operations
/// that result came from. Folded as the driver folds them: an attempt's ops
/// are dropped when it fails, and carried over into the attempt that runs
/// again after a crash, so they are those of the successful attempt.
fn successes(journal: &[JournalEntry]) -> HashMap<&str, (Value, Vec<ReusedOp>)> {
    let mut ops: HashMap<&str, Vec<ReusedOp>> = HashMap::new();
    let mut done = HashMap::new();
    for entry in journal {
        match &entry.event {
            Event::StepOp { step, index, name, value, .. } => {
                let op = ReusedOp { index: *index, name: name.clone(), value: value.clone() };
                ops.entry(step.as_str()).or_default().push(op);
            }
            Event::StepFailed { step, .. } => {
                ops.remove(step.as_str());
            }
            Event::StepSucceeded { step, output, .. } => {
                done.insert(step.as_str(), (output.clone(), ops.remove(step.as_str()).unwrap_or_default()));
            }
            Event::StepReused { step, output, ops: carried, .. } => {
                done.insert(step.as_str(), (output.clone(), carried.clone()));
            }
            _ => {}
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use switchyard_steps::StepError;

    use super::*;
    use crate::compile::compile_bundle;
    use crate::workflow::Bundle;

    fn compile(yaml: &str) -> Definition {
        let bundle = Bundle { root: "wf.yaml".into(), files: [("wf.yaml".to_owned(), yaml.to_owned())].into() };
        compile_bundle(&bundle, &crate::offline_registry()).unwrap_or_else(|e| panic!("{e}"))
    }

    const CHAIN: &str = "name: c\nsteps:\n  - {id: a, kind: transform, with: {v: 1}}\n  \
                         - {id: b, kind: transform, needs: [a], with: {v: 2}}\n  \
                         - {id: c, kind: transform, needs: [b], with: {v: 3}}\n  \
                         - {id: side, kind: transform, with: {v: 4}}\n";

    fn entries(events: Vec<Event>) -> Vec<JournalEntry> {
        events.into_iter().enumerate().map(|(i, event)| JournalEntry { seq: i as i64, at: 0, event }).collect()
    }

    fn op(step: &str, attempt: u32, index: u32) -> Event {
        Event::StepOp { step: step.into(), attempt, index, name: "llm_call".into(), value: json!(attempt), at: None }
    }

    fn succeeded(step: &str, attempt: u32) -> Event {
        Event::StepSucceeded { step: step.into(), attempt, output: json!({"from": step}) }
    }

    fn reused_ids(events: &[Event]) -> Vec<&str> {
        events
            .iter()
            .map(|e| match e {
                Event::StepReused { step, .. } => step.as_str(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn upstream_and_unrelated_unchanged_successes_are_reused_with_the_ops_of_their_success() {
        let def = compile(CHAIN);
        let failed = Event::StepFailed {
            step: "a".into(),
            attempt: 1,
            error: StepError::retryable("x", "y"),
            retry_at: Some(1),
            continued: false,
        };
        let journal = entries(vec![
            Event::StepStarted { step: "a".into(), attempt: 1 },
            op("a", 1, 0),
            failed,
            Event::StepStarted { step: "a".into(), attempt: 2 },
            op("a", 2, 0),
            succeeded("a", 2),
            succeeded("b", 1),
            succeeded("c", 1),
            succeeded("side", 1),
        ]);
        let wf = &def.workflow;
        let events = reused_steps(wf, &journal, wf, wf.step_index("b").unwrap(), "r0");
        let mut ids = reused_ids(&events);
        ids.sort();
        assert_eq!(ids, ["a", "side"]);
        let a = events.iter().find(|e| matches!(e, Event::StepReused { step, .. } if step == "a")).unwrap();
        let Event::StepReused { from_run, output, ops, .. } = a else { unreachable!() };
        assert_eq!((from_run.as_str(), output), ("r0", &json!({"from": "a"})));
        // Only the successful attempt's call; the failed attempt's is gone.
        assert_eq!(ops, &[ReusedOp { index: 0, name: "llm_call".into(), value: json!(2) }]);

        // From the first step: only the unrelated one.
        let events = reused_steps(wf, &journal, wf, wf.step_index("a").unwrap(), "r0");
        assert_eq!(reused_ids(&events), ["side"]);
    }

    #[test]
    fn an_edited_step_and_what_needs_it_run_again() {
        let original = compile(CHAIN);
        let edited = compile(&CHAIN.replace("with: {v: 1}", "with: {v: 10}"));
        let journal = entries(vec![succeeded("a", 1), succeeded("b", 1), succeeded("c", 1), succeeded("side", 1)]);
        let from = edited.workflow.step_index("c").unwrap();
        let events = reused_steps(&original.workflow, &journal, &edited.workflow, from, "r0");
        assert_eq!(reused_ids(&events), ["side"]);
        // A step that did not succeed (here: never ran) is not reused, nor is what needs it.
        let journal = entries(vec![succeeded("b", 1), succeeded("c", 1)]);
        let events = reused_steps(&original.workflow, &journal, &original.workflow, from, "r0");
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn a_reused_step_is_reused_again_with_its_ops() {
        let def = compile(CHAIN);
        let carried = vec![ReusedOp { index: 0, name: "llm_call".into(), value: json!("paid once") }];
        let journal = entries(vec![
            Event::StepReused { step: "a".into(), from_run: "r0".into(), output: json!(1), ops: carried.clone() },
            succeeded("b", 1),
            succeeded("c", 1),
        ]);
        let wf = &def.workflow;
        let events = reused_steps(wf, &journal, wf, wf.step_index("c").unwrap(), "r1");
        assert_eq!(reused_ids(&events), ["a", "b"]);
        assert_eq!(
            events[0],
            Event::StepReused { step: "a".into(), from_run: "r1".into(), output: json!(1), ops: carried }
        );
    }
}
