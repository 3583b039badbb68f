//! Durable waits for signals: a run whose steps wait for a signal parks with
//! no task, no lease and no timer; a committed signal wakes it, in this
//! process or another; a parent whose child runs wait parks too.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_orchestrator::engine::{Cancelled, Error as EngineError};
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::store::Signalled;
use switchyard_orchestrator::{Engine, EngineOptions};
use switchyard_steps::{Clock, ManualClock, SystemClock};
use switchyard_tests::temp_dir;

use crate::support::{compile, drive, engine, journal, store};

const T0: i64 = 1_800_000_000_000;

fn quick() -> EngineOptions {
    EngineOptions { poll_interval: Duration::from_millis(20), ..Default::default() }
}

const GATE: &str = r#"
name: gate
steps:
  - id: ask
    kind: transform
    with: {question: "{{ input.q }}"}
  - id: gate
    kind: wait
    needs: [ask]
    with: {signal: approved}
  - id: after
    kind: transform
    needs: [gate]
    with: {ok: "{{ steps.gate.output.payload.ok }}", by: "{{ steps.gate.output.actor }}"}
output: "{{ steps.after.output }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_a_signal_parks_and_the_signal_finishes_it() {
    let dir = temp_dir("signal-basic");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), quick());
    let def = compile(&dir, "gate.yaml", GATE);
    let id = engine.submit(&def, json!({"q": "deploy?"})).await.unwrap();

    // Parked for the signal: no task, no lease, no timer.
    let parked = engine.wait_settled(&id).await.unwrap();
    assert_eq!((parked.status, parked.wake_at), (RunStatus::Waiting, None));
    assert_eq!(engine.active_runs(), 0);
    let row = store.run(&id).await.unwrap().unwrap();
    assert_eq!((row.status, row.owner, row.wake_at), (RunStatus::Waiting, None, None));

    // Bad signals are refused with their reason and change nothing.
    for (name, payload) in [("", json!(1)), ("no spaces", json!(1)), ("x".repeat(200).as_str(), json!(1))] {
        let err = engine.signal(&id, name, payload, None).await.unwrap_err();
        assert!(matches!(err, EngineError::InvalidInput(_)), "{name:?}: {err}");
    }
    let deep = (0..100).fold(json!(1), |v, _| json!([v]));
    assert!(matches!(engine.signal(&id, "approved", deep, None).await, Err(EngineError::InvalidInput(_))));
    assert!(matches!(engine.signal("no-such-run", "approved", json!(1), None).await, Err(EngineError::NotFound(_))));

    let sent = engine.signal(&id, "approved", json!({"ok": true}), Some("test:alice")).await.unwrap();
    assert_eq!(sent, Signalled::Delivered { root: id.clone(), waiting: true });
    let done = engine.wait(&id).await.unwrap();
    assert_eq!(done.status, RunStatus::Succeeded, "{done:?}");
    assert_eq!(done.output, Some(json!({"ok": true, "by": "test:alice"})));

    // The wait and the signal are in the journal; the signal was received once.
    let j = journal(&store, &id).await;
    let waits = j.iter().filter(|e| matches!(&e.event, Event::StepWaiting { signal: Some(s), .. } if s == "approved"));
    assert_eq!(waits.count(), 1);
    let received: Vec<_> = j
        .iter()
        .filter_map(|e| match &e.event {
            Event::SignalReceived { name, payload, actor, .. } => Some((name.clone(), payload.clone(), actor.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(received, [("approved".to_owned(), json!({"ok": true}), Some("test:alice".to_owned()))]);
    // Finished: a signal now is refused.
    let late = engine.signal(&id, "approved", json!({"ok": false}), None).await.unwrap();
    assert_eq!(late, Signalled::Finished(RunStatus::Succeeded));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_before_the_step_waits_is_kept_until_it_does() {
    let clock = ManualClock::new(T0);
    let dir = temp_dir("signal-early");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(clock.clone()), quick());
    let yaml = r#"
name: early
steps:
  - id: nap
    kind: sleep
    with: {duration: 1h}
  - id: gate
    kind: wait
    needs: [nap]
    with: {signal: go}
output: "{{ steps.gate.output.payload }}"
"#;
    let def = compile(&dir, "early.yaml", yaml);
    let id = engine.submit(&def, json!({})).await.unwrap();
    let parked = engine.wait_settled(&id).await.unwrap();
    assert_eq!((parked.status, parked.wake_at), (RunStatus::Waiting, Some(T0 + 3_600_000)));
    let sent = engine.signal(&id, "go", json!("early bird"), None).await.unwrap();
    assert_eq!(sent, Signalled::Delivered { root: id.clone(), waiting: false });
    assert_eq!(engine.signal(&id, "go", json!("again"), None).await.unwrap(), Signalled::Duplicate);
    let done = drive(&clock, engine.wait(&id)).await.unwrap();
    assert_eq!((done.status, done.output), (RunStatus::Succeeded, Some(json!("early bird"))));
    // The nap was not cut short by the signal.
    assert!(clock.now_ms() >= T0 + 3_600_000);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_times_out_with_its_default_or_fails() {
    let clock = ManualClock::new(T0);
    let dir = temp_dir("signal-timeout");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(clock.clone()), quick());
    let with_default = compile(
        &dir,
        "default.yaml",
        "name: d\nsteps:\n  - {id: gate, kind: wait, with: {signal: go, timeout: 2h, default: {ok: false}}}\n",
    );
    let id = engine.submit(&with_default, json!({})).await.unwrap();
    let parked = engine.wait_settled(&id).await.unwrap();
    assert_eq!(parked.wake_at, Some(T0 + 7_200_000), "parked until the deadline");
    let done = drive(&clock, engine.wait(&id)).await.unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert_eq!(done.output, Some(json!({"gate": {"signal": "go", "payload": {"ok": false}, "timed_out": true}})));

    let without =
        compile(&dir, "strict.yaml", "name: s\nsteps:\n  - {id: gate, kind: wait, with: {signal: go, timeout: 10m}}\n");
    let id = engine.submit(&without, json!({})).await.unwrap();
    let done = drive(&clock, engine.wait(&id)).await.unwrap();
    assert_eq!(done.status, RunStatus::Failed);
    assert_eq!(done.error.unwrap().code, "timeout");
    // The wait ended with the deadline: a late signal is refused.
    assert_eq!(engine.signal(&id, "go", json!(1), None).await.unwrap(), Signalled::Finished(RunStatus::Failed));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_run_waiting_for_a_signal_parks_its_parent() {
    let dir = temp_dir("signal-child");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), quick());
    std::fs::write(
        dir.join("approve.yaml"),
        "name: approve\nsteps:\n  - {id: gate, kind: wait, with: {signal: approved}}\noutput: \"{{ steps.gate.output.payload }}\"\n",
    )
    .unwrap();
    let yaml = "name: outer\nsteps:\n  - {id: sub, kind: workflow, with: {path: approve.yaml}}\n  - {id: after, kind: transform, needs: [sub], with: {got: \"{{ steps.sub.output }}\"}}\noutput: \"{{ steps.after.output.got }}\"\n";
    let def = compile(&dir, "outer.yaml", yaml);
    let id = engine.submit(&def, json!({})).await.unwrap();
    let parked = engine.wait_settled(&id).await.unwrap();
    assert_eq!((parked.status, parked.wake_at), (RunStatus::Waiting, None));
    assert_eq!(engine.active_runs(), 0, "the root is not held while its child waits");
    let child = format!("{id}/sub");
    assert_eq!(store.run(&child).await.unwrap().unwrap().status, RunStatus::Waiting);
    // The signal goes to the child run, which is the one waiting.
    assert_eq!(
        engine.signal(&id, "approved", json!(1), None).await.unwrap(),
        Signalled::Delivered { root: id.clone(), waiting: false }
    );
    let sent = engine.signal(&child, "approved", json!("yes"), None).await.unwrap();
    assert_eq!(sent, Signalled::Delivered { root: id.clone(), waiting: true });
    let done = engine.wait(&id).await.unwrap();
    assert_eq!((done.status, done.output.clone()), (RunStatus::Succeeded, Some(json!("yes"))), "{done:?}");
    engine.shutdown().await;
}

fn map_yaml(concurrency: usize) -> String {
    format!(
        r#"
name: fan
steps:
  - id: m
    kind: map
    with:
      items: "{{{{ range(input.n) | list }}}}"
      concurrency: {concurrency}
      steps:
        - {{id: gate, kind: wait, with: {{signal: go}}}}
        - {{id: out, kind: transform, needs: [gate], with: "{{{{ steps.gate.output.payload * 2 + input.item }}}}"}}
      output: "{{{{ steps.out.output }}}}"
output: "{{{{ steps.m.output }}}}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_whose_children_wait_parks_and_their_signals_finish_it() {
    let dir = temp_dir("signal-map");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), quick());
    let n = 120;
    // Parked children do not count against the concurrency: all of them get
    // to their wait although only 5 run at once.
    let def = compile(&dir, "fan.yaml", &map_yaml(5));
    let id = engine.submit(&def, json!({"n": n})).await.unwrap();
    let parked = engine.wait_settled(&id).await.unwrap();
    assert_eq!((parked.status, parked.wake_at), (RunStatus::Waiting, None));
    assert_eq!(engine.active_runs(), 0);
    let children = store.child_states(&id).await.unwrap();
    assert_eq!(children.len(), n);
    assert!(children.iter().all(|c| c.status == RunStatus::Waiting && c.wake_at.is_none()), "{children:?}");

    // Signals in reverse order, some while the root is being driven again.
    for i in (0..n).rev() {
        let sent = engine.signal(&format!("{id}/m/{i}"), "go", json!(i), None).await.unwrap();
        assert!(matches!(sent, Signalled::Delivered { waiting: true, .. }), "{i}: {sent:?}");
    }
    let done = engine.wait(&id).await.unwrap();
    assert_eq!(done.status, RunStatus::Succeeded, "{done:?}");
    let expected: Vec<Value> = (0..n).map(|i| json!(i * 3)).collect();
    assert_eq!(done.output, Some(Value::Array(expected)));
    // Each child waited once and received its signal once.
    for i in [0, n / 2, n - 1] {
        let j = journal(&store, &format!("{id}/m/{i}")).await;
        let received = j.iter().filter(|e| matches!(e.event, Event::SignalReceived { .. })).count();
        let waited = j.iter().filter(|e| matches!(e.event, Event::StepWaiting { .. })).count();
        assert_eq!((received, waited), (1, 1), "child {i}");
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_from_another_process_wakes_the_run_where_it_is_awaited() {
    let dir = temp_dir("signal-remote");
    let store = store(&dir).await;
    let here = engine(store.clone(), Arc::new(SystemClock), quick());
    // Another process on the same database (the CLI's `switchyard signal`).
    let elsewhere = engine(crate::support::store(&dir).await, Arc::new(SystemClock), quick());
    let def = compile(&dir, "gate.yaml", GATE);
    let id = here.submit(&def, json!({"q": "?"})).await.unwrap();
    assert_eq!(here.wait_settled(&id).await.unwrap().status, RunStatus::Waiting);
    elsewhere.signal(&id, "approved", json!({"ok": 1}), Some("cli:bob")).await.unwrap();
    elsewhere.shutdown().await;
    let done = here.wait(&id).await.unwrap();
    assert_eq!((done.status, done.output), (RunStatus::Succeeded, Some(json!({"ok": 1, "by": "cli:bob"}))));
    here.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_a_signal_survives_a_restart_and_a_worker_finishes_it() {
    let dir = temp_dir("signal-restart");
    let first = engine(store(&dir).await, Arc::new(SystemClock), quick());
    let def = compile(&dir, "fan.yaml", &map_yaml(3));
    let id = first.submit(&def, json!({"n": 6})).await.unwrap();
    assert_eq!(first.wait_settled(&id).await.unwrap().status, RunStatus::Waiting);
    first.shutdown().await;

    let worker: Engine = engine(store(&dir).await, Arc::new(SystemClock), EngineOptions { worker: true, ..quick() });
    for i in 0..6 {
        worker.signal(&format!("{id}/m/{i}"), "go", json!(10), None).await.unwrap();
    }
    let done = worker.wait(&id).await.unwrap();
    let expected: Vec<Value> = (0..6).map(|i| json!(20 + i)).collect();
    assert_eq!((done.status, done.output), (RunStatus::Succeeded, Some(Value::Array(expected))));
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_waiting_for_signals_ends_it_and_its_children() {
    let dir = temp_dir("signal-cancel");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), quick());
    let def = compile(&dir, "fan.yaml", &map_yaml(2));
    let id = engine.submit(&def, json!({"n": 4})).await.unwrap();
    assert_eq!(engine.wait_settled(&id).await.unwrap().status, RunStatus::Waiting);
    assert_eq!(engine.cancel_as(&id, Some("test:carol")).await.unwrap(), Cancelled::Done);
    assert_eq!(store.run(&id).await.unwrap().unwrap().status, RunStatus::Cancelled);
    for child in store.child_states(&id).await.unwrap() {
        assert_eq!(child.status, RunStatus::Cancelled, "{}", child.id);
        let late = engine.signal(&child.id, "go", json!(1), None).await.unwrap();
        assert_eq!(late, Signalled::Finished(RunStatus::Cancelled));
    }
    engine.shutdown().await;
}
