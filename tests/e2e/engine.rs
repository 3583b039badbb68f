//! The engine in-process: retries, timeouts, cancellation, concurrency,
//! branches, durable sleeps, map, resume.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_orchestrator::EngineOptions;
use switchyard_orchestrator::engine::Cancelled;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_steps::{Clock, ManualClock, SystemClock};
use switchyard_tests::{CounterServer, temp_dir};

use crate::support::{Fixture, compile, drive, engine, journal, step_events, stop, store};

const T0: i64 = 1_800_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy_under_a_manual_clock() {
    let clock = ManualClock::new(T0);
    let Fixture { server, dir, store, engine } = Fixture::new("retries", Arc::new(clock.clone())).await;
    let yaml = format!(
        r#"
name: retries
steps:
  - id: flaky
    kind: http
    with: {{url: "{flaky}"}}
    retry: {{max_attempts: 4, initial_delay: 10s, multiplier: 3, max_delay: 1m}}
  - id: hopeless
    kind: http
    needs: [flaky]
    with: {{url: "{hopeless}"}}
    retry: {{max_attempts: 3, initial_delay: 10s, multiplier: 10, max_delay: 15s}}
"#,
        flaky = server.url("/hit/flaky?fail_first=2"),
        hopeless = server.url("/hit/hopeless?fail_first=100"),
    );
    let def = compile(&dir, "retries.yaml", &yaml);
    let outcome = drive(&clock, engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);

    // flaky: two 503s, then success on attempt 3, after 10s and 30s.
    assert_eq!(server.count("flaky"), 3);
    let keys: Vec<_> = server.calls_to("flaky").into_iter().map(|c| c.idempotency_key).collect();
    assert!(keys.iter().all(|k| k.as_deref() == Some(&format!("{}/flaky", outcome.id)[..])), "{keys:?}");
    let j = journal(&store, &outcome.id).await;
    let delays: Vec<i64> = step_events(&j, "flaky")
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepFailed { retry_at: Some(at), .. } => Some(at - e.at),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [10_000, 30_000]);

    // hopeless: stops at max_attempts, the delay clamped to max_delay.
    assert_eq!(server.count("hopeless"), 3);
    let delays: Vec<i64> = step_events(&j, "hopeless")
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepFailed { retry_at: Some(at), .. } => Some(at - e.at),
            _ => None,
        })
        .collect();
    assert_eq!(delays, [10_000, 15_000]);
    assert!(outcome.error.unwrap().message.contains("step hopeless"));
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_errors_are_not_retried() {
    let clock = ManualClock::new(T0);
    let Fixture { server, dir, store: _, engine } = Fixture::new("noretry", Arc::new(clock.clone())).await;
    let yaml = format!(
        "name: noretry\nsteps:\n  - id: bad\n    kind: http\n    with: {{url: \"{}\"}}\n    retry: {{max_attempts: 5}}\n",
        server.url("/hit/bad?status=404")
    );
    let def = compile(&dir, "noretry.yaml", &yaml);
    let outcome = drive(&clock, engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.error.unwrap().code, "http_404");
    assert_eq!(server.count("bad"), 1);
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fails_the_attempt() {
    let clock = ManualClock::new(T0);
    let Fixture { server, dir, store, engine } = Fixture::new("timeout", Arc::new(clock.clone())).await;
    let yaml = format!(
        "name: slow\nsteps:\n  - id: slow\n    kind: http\n    timeout: 30s\n    with: {{url: \"{}\"}}\n",
        server.url("/hit/slow?hold_first=5")
    );
    let def = compile(&dir, "slow.yaml", &yaml);
    let outcome = drive(&clock, engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.error.as_ref().unwrap().code, "timeout");
    let j = journal(&store, &outcome.id).await;
    let failed_at = step_events(&j, "slow").last().unwrap().at;
    let started_at = step_events(&j, "slow")[0].at;
    assert_eq!(failed_at - started_at, 30_000);
    // The abandoned request was dropped, not left running.
    server.wait_idle().await;
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_run_and_its_running_steps() {
    let Fixture { server, dir, store, engine } = Fixture::new("cancel", Arc::new(SystemClock)).await;
    let yaml = format!(
        "name: blocked\nsteps:\n  - id: wait\n    kind: http\n    with: {{url: \"{}\"}}\n  - id: after\n    kind: transform\n    needs: [wait]\n    with: {{}}\n",
        server.url("/hit/block?hold_first=1")
    );
    let def = compile(&dir, "blocked.yaml", &yaml);
    let id = engine.submit(&def, json!({})).await.unwrap();
    server.wait_for_held("block").await;
    assert_eq!(engine.cancel(&id).await.unwrap(), Cancelled::Done);
    let outcome = engine.wait(&id).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Cancelled);
    server.wait_idle().await;
    assert_eq!(server.calls_to("block")[0].ended_at, None, "the held request was abandoned");
    let record = store.run(&id).await.unwrap().unwrap();
    assert_eq!(record.status, RunStatus::Cancelled);
    assert!(step_events(&journal(&store, &id).await, "after").is_empty());
    assert_eq!(engine.cancel(&id).await.unwrap(), Cancelled::AlreadyFinished(RunStatus::Cancelled));
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_steps_overlap() {
    let Fixture { server, dir, store, engine } = Fixture::new("overlap", Arc::new(SystemClock)).await;
    let yaml = format!(
        r#"
name: overlap
steps:
  - id: a
    kind: http
    with: {{url: "{a}"}}
  - id: b
    kind: http
    with: {{url: "{b}"}}
  - id: both
    kind: transform
    needs: [a, b]
    with: ["{{{{ steps.a.output.body.name }}}}", "{{{{ steps.b.output.body.name }}}}"]
output: "{{{{ steps.both.output }}}}"
"#,
        a = server.url("/hit/a?hold_first=1"),
        b = server.url("/hit/b?hold_first=1"),
    );
    let def = compile(&dir, "overlap.yaml", &yaml);
    let id = engine.submit(&def, json!({})).await.unwrap();
    // Both requests are in flight at once before either is answered.
    server.wait_for_held("a").await;
    server.wait_for_held("b").await;
    assert_eq!(server.in_flight(), 2);
    server.release("a");
    server.release("b");
    let outcome = engine.wait(&id).await.unwrap();
    assert_eq!(outcome.output, Some(json!(["a", "b"])));
    let j = journal(&store, &id).await;
    let span = |step: &str| {
        let ev = step_events(&j, step);
        (ev.first().unwrap().at, ev.last().unwrap().at)
    };
    let (a0, a1) = span("a");
    let (b0, b1) = span("b");
    assert!(a0 <= b1 && b0 <= a1, "a {a0}..{a1} and b {b0}..{b1} do not overlap");
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_skips_the_other_path_and_the_join_runs() {
    let dir = temp_dir("switch");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), EngineOptions::default());
    let def = compile(
        &dir,
        "switch.yaml",
        r#"
name: triage
steps:
  - id: route
    kind: switch
    with:
      cases:
        - {when: "input.severity == 'critical'", path: page}
      default: ticket
  - id: page
    kind: transform
    needs: [route.page]
    with: {action: page}
  - id: escalate
    kind: transform
    needs: [page]
    with: {action: escalate}
  - id: ticket
    kind: transform
    needs: [route.ticket]
    with: {action: ticket}
  - id: done
    kind: transform
    needs: [escalate, ticket]
    join: any
    with:
      page: "{{ steps.escalate.status }}"
      ticket: "{{ steps.ticket.status }}"
  - id: strict
    kind: transform
    needs: [escalate, ticket]
    with: {}
output: "{{ steps.done.output }}"
"#,
    );
    let outcome = engine.run(&def, json!({"severity": "low"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!({"page": "skipped", "ticket": "succeeded"})));
    let j = journal(&store, &outcome.id).await;
    let skipped = |step: &str| step_events(&j, step).iter().any(|e| matches!(e.event, Event::StepSkipped { .. }));
    assert!(skipped("page") && skipped("escalate") && skipped("strict"));
    assert!(!skipped("ticket") && !skipped("done"));

    let outcome = engine.run(&def, json!({"severity": "critical"})).await.unwrap();
    assert_eq!(outcome.output, Some(json!({"page": "succeeded", "ticket": "skipped"})));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_long_sleep_survives_a_restart() {
    let dir = temp_dir("sleep");
    let store = store(&dir).await;
    let yaml = r#"
name: nap
steps:
  - id: before
    kind: transform
    with: {at: "{{ input.n }}"}
  - id: nap
    kind: sleep
    needs: [before]
    with: {duration: 1h}
  - id: after
    kind: transform
    needs: [nap]
    with: {slept_until: "{{ steps.nap.output.woke_at_ms }}"}
output: "{{ steps.after.output }}"
"#;
    let def = compile(&dir, "nap.yaml", yaml);

    let clock = ManualClock::new(T0);
    let first = engine(store.clone(), Arc::new(clock.clone()), EngineOptions::default());
    let id = first.submit(&def, json!({"n": 1})).await.unwrap();
    // The run parks: its only timer is the engine's wake-up an hour from now.
    assert_eq!(clock.next_sleeper().await, T0 + 3_600_000);
    let parked = store.run(&id).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::Waiting);
    assert_eq!(parked.owner, None, "a parked run holds no lease");
    first.shutdown().await;

    // A new process, half an hour later: the run still waits.
    let clock = ManualClock::new(T0 + 1_800_000);
    let options = EngineOptions { worker: true, ..Default::default() };
    let second = engine(store.clone(), Arc::new(clock.clone()), options);
    assert_eq!(clock.next_sleeper().await, T0 + 3_600_000);
    assert_eq!(store.run(&id).await.unwrap().unwrap().status, RunStatus::Waiting);
    clock.advance(Duration::from_secs(1800));
    let outcome = drive(&clock, second.wait(&id)).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!({"slept_until": T0 + 3_600_000})));
    let j = journal(&store, &id).await;
    let starts = |s: &str| step_events(&j, s).iter().filter(|e| matches!(e.event, Event::StepStarted { .. })).count();
    assert_eq!((starts("before"), starts("nap"), starts("after")), (1, 1, 1));
    assert!(clock.now_ms() >= T0 + 3_600_000);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_bounds_concurrency_and_keeps_item_order() {
    let Fixture { server, dir, store, engine } = Fixture::new("map", Arc::new(SystemClock)).await;
    let yaml = format!(
        r#"
name: fan
steps:
  - id: each
    kind: map
    with:
      items: "{{{{ range(input.n) | list }}}}"
      concurrency: 10
      input: {{n: "{{{{ item }}}}"}}
      steps:
        - id: call
          kind: http
          with:
            url: "{url}"
            query: {{i: "{{{{ input.n }}}}"}}
      output: "{{{{ steps.call.output.body.query.i | int * 2 }}}}"
output: "{{{{ steps.each.output }}}}"
"#,
        url = server.url("/hit/item"),
    );
    let def = compile(&dir, "fan.yaml", &yaml);
    let outcome = engine.run(&def, json!({"n": 1000})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    let expected: Vec<Value> = (0..1000).map(|i| json!(i * 2)).collect();
    assert_eq!(outcome.output, Some(Value::Array(expected)));
    assert_eq!(server.count("item"), 1000);
    assert!(server.max_in_flight() <= 10, "max in flight {}", server.max_in_flight());
    assert_eq!(store.children(&outcome.id).await.unwrap().len(), 1000);
    // Each item's step has its own idempotency key, with the item index.
    let key = server.calls_to("item").into_iter().find(|c| c.query["i"] == "7").unwrap().idempotency_key;
    assert_eq!(key.as_deref(), Some(&format!("{}/each/7/call", outcome.id)[..]));
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_resumes_from_the_failed_step() {
    let Fixture { server, dir, store: _, engine } = Fixture::new("resume", Arc::new(SystemClock)).await;
    let yaml = format!(
        r#"
name: incomplete
steps:
  - id: first
    kind: http
    with: {{url: "{first}"}}
  - id: child
    kind: workflow
    needs: [first]
    with: {{path: child.yaml, input: {{n: 2}}}}
output: "{{{{ steps.child.output }}}}"
"#,
        first = server.url("/hit/first"),
    );
    let child = format!(
        "name: child\nsteps:\n  - id: once\n    kind: http\n    with: {{url: \"{}\"}}\n  - id: flaky\n    kind: http\n    needs: [once]\n    with: {{url: \"{}\"}}\noutput: \"{{{{ input.n * 10 }}}}\"\n",
        server.url("/hit/once"),
        server.url("/hit/flaky?fail_first=1")
    );
    std::fs::write(dir.join("child.yaml"), child).unwrap();
    let def = compile(&dir, "incomplete.yaml", &yaml);
    let outcome = engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.error.as_ref().unwrap().code, "child_failed");

    engine.resume(&outcome.id).await.unwrap();
    let resumed = engine.wait(&outcome.id).await.unwrap();
    assert_eq!(resumed.status, RunStatus::Succeeded, "{:?}", resumed.error);
    assert_eq!(resumed.output, Some(json!(20)));
    // Completed work was reused: only the failed step ran again.
    assert_eq!((server.count("first"), server.count("once"), server.count("flaky")), (1, 1, 2));
    assert!(engine.resume(&outcome.id).await.is_err(), "a succeeded run cannot be resumed");
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_workflow_concurrency_queues_excess_runs() {
    let Fixture { server, dir, store, engine } = Fixture::new("limit", Arc::new(SystemClock)).await;
    let yaml = format!(
        "name: limited\nconcurrency: 1\nsteps:\n  - id: work\n    kind: http\n    with: {{url: \"{}\"}}\n",
        server.url("/hit/work?hold_first=1")
    );
    let def = compile(&dir, "limited.yaml", &yaml);
    let first = engine.submit(&def, json!({})).await.unwrap();
    server.wait_for_held("work").await;
    let second = engine.submit(&def, json!({})).await.unwrap();
    // The second run waits for the first one's slot.
    assert_eq!(store.run(&second).await.unwrap().unwrap().status, RunStatus::Queued);
    assert_eq!(server.count("work"), 1);
    server.release("work");
    for id in [&first, &second] {
        assert_eq!(engine.wait(id).await.unwrap().status, RunStatus::Succeeded);
    }
    assert_eq!(server.count("work"), 2);
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_rejected_before_anything_is_stored() {
    let dir = temp_dir("input");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), EngineOptions::default());
    let def = compile(
        &dir,
        "typed.yaml",
        "name: typed\ninput: {type: object, required: [n], properties: {n: {type: integer}}}\nsteps:\n  - id: t\n    kind: transform\n    with: {}\n",
    );
    let err = engine.submit(&def, json!({"n": "x"})).await.unwrap_err();
    assert!(err.to_string().contains("input/n"), "{err}");
    assert!(store.runs(None, true, 10).await.unwrap().is_empty());
    engine.shutdown().await;
    let _ = SystemClock.now_ms();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_runs_to_the_next_worker_without_ending_them() {
    let server = CounterServer::start().await;
    let dir = temp_dir("handover");
    let store = store(&dir).await;
    let yaml = format!(
        "name: handover\nsteps:\n  - id: first\n    kind: transform\n    with: {{ok: true}}\n  - id: slow\n    kind: http\n    needs: [first]\n    with: {{url: \"{}\"}}\noutput: \"{{{{ steps.slow.output.body.count }}}}\"\n",
        server.url("/hit/slow?hold_first=1")
    );
    let def = compile(&dir, "handover.yaml", &yaml);
    let first = engine(store.clone(), Arc::new(SystemClock), EngineOptions::default());
    let id = first.submit(&def, json!({})).await.unwrap();
    server.wait_for_held("slow").await;
    first.shutdown().await;
    let left = store.run(&id).await.unwrap().unwrap();
    assert_eq!((left.status, left.owner), (RunStatus::Running, None));

    let options = EngineOptions { worker: true, ..Default::default() };
    let second = engine(store.clone(), Arc::new(SystemClock), options);
    let outcome = second.wait(&id).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!(2)), "the interrupted request was made again");
    let j = journal(&store, &id).await;
    let starts = |s: &str| step_events(&j, s).iter().filter(|e| matches!(e.event, Event::StepStarted { .. })).count();
    assert_eq!((starts("first"), starts("slow")), (1, 2));
    second.shutdown().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sleep_waits_in_memory_and_records_its_time_once() {
    let dir = temp_dir("nap");
    let store = store(&dir).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), Arc::new(clock.clone()), EngineOptions::default());
    let def = compile(
        &dir,
        "short.yaml",
        "name: short\nsteps:\n  - id: nap\n    kind: sleep\n    with: {duration: 3s}\noutput: \"{{ steps.nap.output.until_ms }}\"\n",
    );
    let outcome = drive(&clock, engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!(T0 + 3_000)));
    let j = journal(&store, &outcome.id).await;
    let ops = step_events(&j, "nap").iter().filter(|e| matches!(e.event, Event::StepOp { .. })).count();
    assert_eq!(ops, 1, "the wake-up time is journaled once");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_step_replays_only_its_own_operations() {
    // Two sleeps in a row: the second must not take the first's journaled
    // wake-up time as its own (each step has its own operations).
    let dir = temp_dir("two-naps");
    let store = store(&dir).await;
    let clock = ManualClock::new(T0);
    let engine = engine(store.clone(), Arc::new(clock.clone()), EngineOptions::default());
    let def = compile(
        &dir,
        "naps.yaml",
        "name: naps\nsteps:\n  - {id: one, kind: sleep, with: {duration: 1m}}\n  - {id: two, kind: sleep, needs: [one], with: {duration: 1m}}\noutput: \"{{ steps.two.output.until_ms }}\"\n",
    );
    let outcome = drive(&clock, engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!(T0 + 120_000)));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_ends_its_child_runs() {
    let Fixture { server, dir, store, engine } = Fixture::new("cancel-children", Arc::new(SystemClock)).await;
    let yaml = format!(
        "name: parent\nsteps:\n  - id: each\n    kind: map\n    with:\n      items: [1, 2]\n      steps:\n        - id: call\n          kind: http\n          with: {{url: \"{}\"}}\n",
        server.url("/hit/c?hold_first=2")
    );
    let def = compile(&dir, "parent.yaml", &yaml);
    let id = engine.submit(&def, json!({})).await.unwrap();
    server.wait_for_calls("c", 2).await;
    assert_eq!(engine.cancel(&id).await.unwrap(), Cancelled::Done);
    let children = store.children(&id).await.unwrap();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c.status == RunStatus::Cancelled), "{children:?}");
    server.wait_idle().await;
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_limit_queues_runs_beyond_it() {
    let server = CounterServer::start().await;
    let dir = temp_dir("global");
    let store = store(&dir).await;
    let options = EngineOptions { max_concurrent_runs: 2, ..Default::default() };
    let engine = engine(store.clone(), Arc::new(SystemClock), options);
    let yaml = format!(
        "name: one\nsteps:\n  - id: work\n    kind: http\n    with: {{url: \"{}\"}}\n",
        server.url("/hit/work?hold_first=2")
    );
    let def = compile(&dir, "one.yaml", &yaml);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(engine.submit(&def, json!({})).await.unwrap());
    }
    server.wait_for_calls("work", 2).await;
    // Two runs hold the two slots; the third is queued, untouched.
    let third = ids.iter().find(|id| {
        !server.calls_to("work").iter().any(|c| c.idempotency_key.as_deref() == Some(&format!("{id}/work")[..]))
    });
    let third = third.expect("one run has not started");
    assert_eq!(store.run(third).await.unwrap().unwrap().status, RunStatus::Queued);
    server.release("work");
    for id in &ids {
        assert_eq!(engine.wait(id).await.unwrap().status, RunStatus::Succeeded);
    }
    assert_eq!(server.count("work"), 3);
    assert!(server.max_in_flight() <= 2);
    stop(engine, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_starts_a_run_once() {
    let dir = temp_dir("once");
    let store = store(&dir).await;
    let engine = engine(store.clone(), Arc::new(SystemClock), EngineOptions::default());
    let def =
        compile(&dir, "once.yaml", "name: once\nsteps:\n  - id: t\n    kind: transform\n    with: \"{{ input.n }}\"\n");
    let first = engine.submit_once(&def, json!({"n": 1}), "nightly-2026-11-24").await.unwrap();
    let again = engine.submit_once(&def, json!({"n": 2}), "nightly-2026-11-24").await.unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.id, again.id);
    assert_eq!(engine.wait(&first.id).await.unwrap().output, Some(json!({"t": 1})));
    assert_eq!(store.runs(None, false, 10).await.unwrap().len(), 1);

    let other = compile(&dir, "other.yaml", "name: other\nsteps:\n  - id: t\n    kind: transform\n    with: {}\n");
    let err = engine.submit_once(&other, json!({}), "nightly-2026-11-24").await.unwrap_err();
    assert!(err.to_string().contains("belongs to run"), "{err}");
    engine.shutdown().await;
}
