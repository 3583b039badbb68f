//! The model kinds (`llm`, `decide`) against a local OpenAI-compatible
//! server: routing, repairs, fallbacks, structured-output fallbacks,
//! Retry-After, provider limits and token budgets.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_integrations::llm::Limits;
use switchyard_orchestrator::compile::compile_file;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::report;
use switchyard_orchestrator::store::Store;
use switchyard_steps::{ManualClock, SystemClock};
use switchyard_tests::{Reply, temp_dir};

use crate::support::{CANARY_KEY, ModelSetup, drive, journal};

type Setup = ModelSetup;

const TRIAGE: &str = r#"
name: triage
steps:
  - id: triage
    kind: decide
    with:
      prompt: "Ticket: {{ input.text }}"
      choices:
        refund: The customer wants their money back.
        bug: Something is broken.
        other: Anything else.
      max_repairs: 1
      fallback: other
      min_confidence: 0.6
  - id: refund
    kind: transform
    needs: [triage.refund]
    with: {value: refund}
  - id: bug
    kind: transform
    needs: [triage.bug]
    with: {value: bug}
  - id: other
    kind: transform
    needs: [triage.other]
    with: {value: other}
  - id: done
    kind: transform
    needs: [refund, bug, other]
    join: any
    with: {value: "{{ steps.triage.output.choice }}"}
output: "{{ steps.done.output.value }}"
"#;

fn output_of<'a>(events: &'a [Event], step: &str) -> &'a Value {
    events
        .iter()
        .find_map(|e| match e {
            Event::StepSucceeded { step: s, output, .. } if s == step => Some(output),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{step} did not succeed: {events:#?}"))
}

fn skipped(events: &[Event], step: &str) -> bool {
    events.iter().any(|e| matches!(e, Event::StepSkipped { step: s, .. } if s == step))
}

async fn events(store: &Arc<dyn Store>, run: &str) -> Vec<Event> {
    journal(store, run).await.into_iter().map(|e| e.event).collect()
}

#[tokio::test]
async fn decide_routes_to_the_chosen_path_and_skips_the_others() {
    let s = Setup::new("decide-route", Arc::new(SystemClock), Limits::default()).await;
    s.server.script(Reply::json(json!({"choice": "bug", "rationale": "A stack trace.", "confidence": 0.92})));
    let def = s.compile(TRIAGE);
    let outcome = s.engine.run(&def, json!({"text": "the app crashes on login"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!("bug")));
    let events = events(&s.store, &outcome.id).await;
    assert!(skipped(&events, "refund") && skipped(&events, "other") && !skipped(&events, "bug"));
    let decision = output_of(&events, "triage");
    assert_eq!(decision["choice"], "bug");
    assert_eq!(decision["rationale"], "A stack trace.");
    assert_eq!(decision["confidence"], 0.92);
    assert_eq!(decision["fallback_used"], false);
    assert_eq!(decision["model"], "test-model");
    assert_eq!(decision["usage"], json!({"input_tokens": 12, "output_tokens": 8}));
    assert_eq!(decision["calls"], 1);

    // What was sent: the choices as an enum, the ticket, the key, a stable idempotency key.
    let sent = &s.server.requests()[0];
    assert_eq!(sent.response_format_type(), Some("json_schema"));
    let schema = &sent.body["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["properties"]["choice"]["enum"], json!(["bug", "other", "refund"]));
    assert_eq!(sent.last_user_message().as_deref(), Some("Ticket: the app crashes on login"));
    assert_eq!(sent.authorization.as_deref(), Some(format!("Bearer {CANARY_KEY}").as_str()));
    assert_eq!(sent.idempotency_key.as_deref(), Some(format!("{}/triage/op/0", outcome.id).as_str()));

    // `runs show` has the decision and the tokens.
    let steps = report::steps(&journal(&s.store, &outcome.id).await);
    let text = report::render(&steps);
    assert!(text.contains("decided bug (confidence 0.92)"), "{text}");
    assert!(text.contains("rationale: A stack trace."), "{text}");
    assert!(text.contains("test-model: 1 model call, 12 in + 8 out tokens"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn an_out_of_set_answer_is_reasked_then_falls_back() {
    let s = Setup::new("decide-out-of-set", Arc::new(SystemClock), Limits::default()).await;
    s.server.script_all([
        Reply::json(json!({"choice": "refunds", "rationale": "r", "confidence": 0.9})),
        Reply::json(json!({"choice": "money", "rationale": "r", "confidence": 0.9})),
    ]);
    let def = s.compile(TRIAGE);
    let outcome = s.engine.run(&def, json!({"text": "give it back"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!("other")));
    let events = events(&s.store, &outcome.id).await;
    let decision = output_of(&events, "triage");
    assert_eq!(
        (decision["fallback_used"].clone(), decision["fallback_reason"].clone()),
        (json!(true), json!("out_of_set"))
    );
    assert_eq!(decision["calls"], 2);
    // The second ask says what was wrong with the first answer.
    let requests = s.server.requests();
    assert_eq!(requests.len(), 2);
    let repair = requests[1].last_user_message().unwrap();
    assert!(repair.contains("\"refunds\" is not one of the choices"), "{repair}");
    s.stop().await;
}

#[tokio::test]
async fn below_min_confidence_the_run_takes_the_fallback() {
    let s = Setup::new("decide-low", Arc::new(SystemClock), Limits::default()).await;
    s.server.script(Reply::json(json!({"choice": "refund", "rationale": "maybe", "confidence": 0.3})));
    let def = s.compile(TRIAGE);
    let outcome = s.engine.run(&def, json!({"text": "hmm"})).await.unwrap();
    assert_eq!(outcome.output, Some(json!("other")));
    let events = events(&s.store, &outcome.id).await;
    let decision = output_of(&events, "triage");
    assert_eq!(decision["fallback_reason"], "low_confidence");
    assert_eq!(decision["model_choice"], "refund");
    assert!(skipped(&events, "refund"));
    let text = report::render(&report::steps(&journal(&s.store, &outcome.id).await));
    assert!(text.contains("decided other (confidence 0.30) [fallback: low_confidence]"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn malformed_answers_without_a_fallback_fail_the_step_quoting_the_answer() {
    let s = Setup::new("decide-malformed", Arc::new(SystemClock), Limits::default()).await;
    s.server.always(Reply::text("I think it is a bug"));
    let def = s.compile(
        "name: d\nsteps:\n  - id: pick\n    kind: decide\n    with:\n      prompt: x\n      max_repairs: 2\n      choices: {a: first, b: second}\n",
    );
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "invalid_decision");
    assert!(error.message.contains("after 3 model calls"), "{}", error.message);
    assert!(error.message.contains("I think it is a bug"), "{}", error.message);
    assert_eq!(s.server.count(), 3);
    s.stop().await;
}

#[test]
fn compile_rejects_undeclared_choices_and_fallbacks() {
    let dir = temp_dir("decide-compile");
    let registry = switchyard_orchestrator::offline_registry();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        r#"
name: bad
steps:
  - id: triage
    kind: decide
    with:
      prompt: x
      fallback: nope
      choices: {refund: r, bug: b}
  - id: after
    kind: transform
    needs: [triage.refnd]
    with: {value: 1}
"#,
    )
    .unwrap();
    let errors = compile_file(&path, &registry).unwrap_err().to_string();
    assert!(errors.contains("steps[0].with.fallback: \"nope\" is not one of the choices"), "{errors}");
    // The step's config is wrong, so its paths are not checked against it.
    let path = dir.join("bad2.yaml");
    std::fs::write(
        &path,
        "name: bad\nsteps:\n  - id: triage\n    kind: decide\n    with: {prompt: x, choices: {refund: r, bug: b}}\n  - id: after\n    kind: transform\n    needs: [triage.refnd]\n    with: {value: 1}\n",
    )
    .unwrap();
    let errors = compile_file(&path, &registry).unwrap_err().to_string();
    assert!(errors.contains("steps[1].needs[0]") && errors.contains("no path \"refnd\""), "{errors}");
    let path = dir.join("bad3.yaml");
    std::fs::write(
        &path,
        "name: bad\nsteps:\n  - id: t\n    kind: decide\n    with: {prompt: x, choices: {only: o}}\n",
    )
    .unwrap();
    let errors = compile_file(&path, &registry).unwrap_err().to_string();
    assert!(errors.contains("steps[0].with.choices: needs at least two entries"), "{errors}");
}

const SUMMARY: &str = r#"
name: summary
steps:
  - id: sum
    kind: llm
    with:
      system: You summarise incidents.
      prompt: "Summarise: {{ input.log }}"
      max_repairs: 1
      output_schema:
        type: object
        properties:
          title: {type: string}
          severity: {type: string, enum: [low, high]}
        required: [title, severity]
output: "{{ steps.sum.output.json }}"
"#;

#[tokio::test]
async fn llm_output_is_validated_and_repaired() {
    let s = Setup::new("llm-schema", Arc::new(SystemClock), Limits::default()).await;
    let def = s.compile(SUMMARY);
    // Valid at once.
    s.server.script(Reply::json(json!({"title": "DB down", "severity": "high"})));
    let outcome = s.engine.run(&def, json!({"log": "db timeout"})).await.unwrap();
    assert_eq!(outcome.output, Some(json!({"title": "DB down", "severity": "high"})));
    let system = s.server.requests()[0].messages()[0]["content"].as_str().unwrap().to_owned();
    assert!(system.starts_with("You summarise incidents.") && system.contains("JSON Schema"), "{system}");

    // Invalid, then valid: re-asked with the validation error.
    s.server.script_all([
        Reply::text("```json\n{\"title\": \"DB down\", \"severity\": \"urgent\"}\n```"),
        Reply::json(json!({"title": "DB down", "severity": "low"})),
    ]);
    let outcome = s.engine.run(&def, json!({"log": "db timeout"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output.unwrap()["severity"], "low");
    let repair = s.server.requests()[2].last_user_message().unwrap();
    assert!(repair.contains("does not match the schema") && repair.contains("/severity"), "{repair}");

    // Invalid twice: fails, quoting the answer and the error.
    s.server.script_all([Reply::json(json!({"title": 1})), Reply::json(json!({"title": 2}))]);
    let outcome = s.engine.run(&def, json!({"log": "x"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "invalid_output");
    assert!(error.message.contains(r#"{\"title\":2}"#) && error.message.contains("severity"), "{}", error.message);
    s.stop().await;
}

#[tokio::test]
async fn a_server_that_refuses_json_schema_still_gets_a_validated_answer() {
    let s = Setup::new("llm-json-object", Arc::new(SystemClock), Limits::default()).await;
    s.server.reject_json_schema(true);
    s.server.always(Reply::json(json!({"title": "t", "severity": "low"})));
    let def = s.compile(SUMMARY);
    let outcome = s.engine.run(&def, json!({"log": "x"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    let kinds: Vec<Option<String>> =
        s.server.requests().iter().map(|r| r.response_format_type().map(str::to_owned)).collect();
    assert_eq!(kinds, [Some("json_schema".to_owned()), Some("json_object".to_owned())]);
    assert_eq!(s.server.requests()[1].body["response_format"]["schema"]["required"], json!(["title", "severity"]));
    // Learnt once: the next run goes straight to json_object.
    s.engine.run(&def, json!({"log": "y"})).await.unwrap();
    assert_eq!(s.server.requests()[2].response_format_type(), Some("json_object"));
    assert_eq!(s.server.count(), 3);
    s.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_on_the_injected_clock() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let s = Setup::new("llm-429", clock.clone(), Limits::default()).await;
    s.server.script_all([Reply::rate_limited(30), Reply::text("hello")]);
    let def = s.compile("name: one\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: hi}\noutput: \"{{ steps.ask.output.text }}\"\n");
    let outcome = drive(&clock, s.engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!("hello")));
    let events = events(&s.store, &outcome.id).await;
    // The failure is journaled, then the step waits 30 s (not the 1 s backoff).
    let ops: Vec<(&str, &Value)> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepOp { name, value, .. } => Some((name.as_str(), value)),
            _ => None,
        })
        .collect();
    assert_eq!(ops[0].0, "llm_call");
    assert_eq!(ops[0].1["outcome"], "unavailable");
    assert!(ops[0].1["message"].as_str().unwrap().contains("HTTP 429"), "{:?}", ops[0]);
    assert_eq!(ops[1], ("sleep_until", &json!(1_000_000 + 30_000)));
    assert_eq!(ops[2].1["outcome"], "answered");
    assert!(events.iter().any(|e| matches!(e, Event::StepSuspended { until, .. } if *until == 1_030_000)));
    assert_eq!(s.server.count(), 2);
    s.stop().await;
}

#[tokio::test]
async fn max_concurrent_holds_across_a_hundred_runs() {
    let limits = Limits { max_concurrent: Some(4), ..Default::default() };
    let s = Setup::new("llm-concurrency", Arc::new(SystemClock), limits).await;
    s.server.always(Reply::text("ok").delay(Duration::from_millis(5)));
    let def = s.compile("name: one\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: hi}\n");
    let runs = (0..100).map(|_| s.engine.run(&def, json!({})));
    let outcomes = futures::future::join_all(runs).await;
    assert!(outcomes.iter().all(|o| o.as_ref().unwrap().status == RunStatus::Succeeded));
    assert_eq!(s.server.count(), 100);
    assert!(s.server.max_in_flight() <= 4, "{} in flight", s.server.max_in_flight());
    assert!(s.server.max_in_flight() >= 2, "the limit is not a lock: {}", s.server.max_in_flight());
    s.stop().await;
}

#[tokio::test]
async fn a_token_budget_stops_the_run_with_budget_exceeded() {
    let s = Setup::new("llm-budget", Arc::new(SystemClock), Limits::default()).await;
    s.server.always(Reply::text("ok").usage(12, 8));
    let def = s.compile(
        r#"
name: budget
limits: {llm_tokens: 30}
steps:
  - {id: a, kind: llm, with: {prompt: one}}
  - {id: b, kind: llm, needs: [a], with: {prompt: two}}
  - {id: c, kind: llm, needs: [b], with: {prompt: three}}
"#,
    );
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed, "{:#?}", events(&s.store, &outcome.id).await);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "budget_exceeded");
    assert!(
        error.message.contains("step c") && error.message.contains("40") && error.message.contains("30"),
        "{}",
        error.message
    );
    assert_eq!(s.server.count(), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_slow_server_times_out_and_the_step_gives_up_after_five_calls() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let s = Setup::new("llm-slow", clock.clone(), Limits::default()).await;
    s.server.always(Reply::text("late").delay(Duration::from_secs(30)));
    let def = s.compile("name: one\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: hi, timeout: 100ms}\n");
    let outcome = drive(&clock, s.engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "llm_unavailable");
    assert!(
        error.message.contains("no answer within") && error.message.contains("after 5 attempts"),
        "{}",
        error.message
    );
    assert_eq!(s.server.count(), 5);
    // The waits between calls were durable: 1, 2, 4 and 8 s on the injected clock.
    let sleeps: Vec<i64> = events(&s.store, &outcome.id)
        .await
        .iter()
        .filter_map(|e| match e {
            Event::StepOp { name, value, .. } if name == "sleep_until" => value.as_i64(),
            _ => None,
        })
        .collect();
    assert_eq!(sleeps.len(), 4);
    let gaps: Vec<i64> = sleeps.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().zip([2_000, 4_000, 8_000]).all(|(g, want)| *g >= want), "{gaps:?}");
    s.stop().await;
}

#[tokio::test]
async fn lenient_decoding_accepts_what_compatible_servers_send() {
    let s = Setup::new("llm-lenient", Arc::new(SystemClock), Limits::default()).await;
    // No `object`, an unknown finish reason and service tier, text parts, no usage.
    s.server.script(Reply::raw(json!({
        "id": "x", "model": "local", "service_tier": "flex-ultra",
        "choices": [{"index": 0, "finish_reason": "eos", "message": {"role": "assistant",
            "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}}],
    })));
    let def = s.compile(
        "name: one\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: hi}\noutput: \"{{ steps.ask.output }}\"\n",
    );
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    let output = outcome.output.unwrap();
    assert_eq!(
        (output["text"].clone(), output["finish_reason"].clone(), output["model"].clone()),
        (json!("hello"), json!("eos"), json!("local"))
    );
    assert!(output["usage"]["input_tokens"].as_u64().unwrap() > 0, "estimated: {output}");
    s.stop().await;
}

#[tokio::test]
async fn an_oversized_answer_fails_the_step_without_asking_again() {
    let s = Setup::new("llm-huge", Arc::new(SystemClock), Limits::default()).await;
    let huge = "x".repeat(9 * 1024 * 1024);
    s.server.always(Reply::raw(json!({"choices": [{"message": {"role": "assistant", "content": huge}}]})));
    let def = s.compile("name: one\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: hi}\n");
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "llm_rejected", "{}", error.message);
    assert!(error.message.contains("exceeds 8388608 bytes"), "{}", error.message);
    assert_eq!(s.server.count(), 1);
    s.stop().await;
}
