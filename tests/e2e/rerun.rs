//! `runs rerun --from`: a new run with the same input in which the unchanged
//! steps before the chosen one are reused (their model calls are not sent
//! again), and the chosen step and its dependents run again. Counted at the
//! local model server.

use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_integrations::llm::Limits;
use switchyard_orchestrator::engine::Error as EngineError;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::{Definition, report};
use switchyard_steps::SystemClock;
use switchyard_tests::{ModelServer, Reply, temp_dir};
use tokio::process::Command;

use crate::support::{ModelSetup, journal};

/// Three model steps in a chain; each prompt has its own marker, so the
/// server answers per step, and each passes the previous answer on.
const CHAIN: &str = r#"
name: chain
steps:
  - id: a
    kind: llm
    with: {prompt: "task-a: outline {{ input.topic }}"}
  - id: b
    kind: llm
    needs: [a]
    with: {prompt: "task-b: expand {{ steps.a.output.text }}"}
  - id: c
    kind: llm
    needs: [b]
    with: {prompt: "task-c: polish {{ steps.b.output.text }}"}
output: "{{ steps.a.output.text }}+{{ steps.b.output.text }}+{{ steps.c.output.text }}"
"#;

/// CHAIN with a's prompt edited.
fn edited_chain() -> String {
    CHAIN.replace("outline {{ input.topic }}", "outline {{ input.topic }} briefly")
}

/// Per-step answers; an edited `a` ("briefly") answers differently.
fn answer_per_step(server: &ModelServer) {
    server.always(Reply::text("ALPHA2").when("briefly"));
    for (marker, text) in [("task-a", "ALPHA"), ("task-b", "BETA"), ("task-c", "GAMMA")] {
        server.always(Reply::text(text).when(marker));
    }
}

/// The shared model setup, with re-run helpers.
struct Setup(ModelSetup);

impl std::ops::Deref for Setup {
    type Target = ModelSetup;
    fn deref(&self) -> &ModelSetup {
        &self.0
    }
}

impl Setup {
    async fn new(name: &str) -> Self {
        Self(ModelSetup::new(name, Arc::new(SystemClock), Limits::default()).await)
    }

    fn compile(&self, file: &str, yaml: &str) -> Definition {
        self.0.compile_as(file, yaml)
    }

    /// Re-runs and waits; the new run must succeed.
    async fn rerun(&self, run: &str, from: &str, def: Option<&Definition>) -> (String, Value) {
        let id = self.engine.rerun(run, from, def).await.unwrap_or_else(|e| panic!("rerun: {e}"));
        let outcome = self.engine.wait(&id).await.unwrap();
        assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}: {:#?}", outcome.error, self.events(&id).await);
        (id, outcome.output.unwrap())
    }

    async fn events(&self, run: &str) -> Vec<Event> {
        journal(&self.store, run).await.into_iter().map(|e| e.event).collect()
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// `(step, from_run, output, number of llm_call ops)` of each `step_reused`.
fn reused(events: &[Event]) -> Vec<(&str, &str, &Value, usize)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StepReused { step, from_run, output, ops } => {
                Some((step.as_str(), from_run.as_str(), output, ops.iter().filter(|o| o.name == "llm_call").count()))
            }
            _ => None,
        })
        .collect()
}

fn output_of<'a>(events: &'a [Event], step: &str) -> &'a Value {
    events
        .iter()
        .find_map(|e| match e {
            Event::StepSucceeded { step: s, output, .. } if s == step => Some(output),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{step} did not succeed: {events:#?}"))
}

/// Steps that started in the run (ran, rather than being reused).
fn started(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted { step, .. } => Some(step.as_str()),
            _ => None,
        })
        .collect()
}

fn prompts(server: &ModelServer, from: usize) -> Vec<String> {
    server.requests()[from..].iter().map(|r| r.last_user_message().unwrap_or_default()).collect()
}

#[tokio::test]
async fn rerun_from_a_step_reuses_what_is_before_it_and_runs_the_rest_again() {
    let s = Setup::new("rerun-chain").await;
    answer_per_step(&s.server);
    let def = s.compile("chain.yaml", CHAIN);
    let first = s.engine.run(&def, json!({"topic": "rust"})).await.unwrap();
    assert_eq!(first.output, Some(json!("ALPHA+BETA+GAMMA")), "{:?}", first.error);
    assert_eq!(s.server.count(), 3);
    let original = s.events(&first.id).await;

    // From b: a is reused, b and c are asked again.
    let (second, output) = s.rerun(&first.id, "b", None).await;
    assert_eq!(s.server.count(), 5, "{:?}", prompts(&s.server, 3));
    let sent = prompts(&s.server, 3);
    assert!(sent[0].starts_with("task-b: expand ALPHA") && sent[1].starts_with("task-c: polish BETA"), "{sent:?}");
    assert_eq!(output, json!("ALPHA+BETA+GAMMA"));
    let events = s.events(&second).await;
    assert_eq!(reused(&events), [("a", first.id.as_str(), output_of(&original, "a"), 1)]);
    // The reuse is written with the start, before anything runs.
    assert!(matches!(&events[1], Event::StepReused { step, .. } if step == "a"), "{events:#?}");
    assert_eq!(started(&events), ["b", "c"]);
    assert!(matches!(&events[0], Event::RunStarted { input, .. } if input == &json!({"topic": "rust"})));

    // `runs show`: a is `reused` from the first run, its tokens not paid again.
    let steps = report::steps(&journal(&s.store, &second).await);
    let a = &steps[0];
    assert_eq!((a.id.as_str(), a.status.as_str()), ("a", "reused"));
    assert_eq!(a.note.as_deref(), Some(format!("from {}", first.id).as_str()));
    let a_llm = a.llm.as_ref().unwrap();
    assert_eq!((a_llm.calls, a_llm.reused, a_llm.input_tokens, a_llm.reused_input_tokens), (0, 1, 0, 12));
    assert_eq!(report::llm_totals(&steps).map(|t| (t.0, t.1)), Some((24, 16)));
    let text = report::render(&steps);
    assert!(text.contains("1 model call reused, 12 in + 8 out tokens not paid again"), "{text}");
    assert!(text.contains("reused model tokens (not paid again): 12 in + 8 out"), "{text}");

    // An edited a: from c, a runs again (changed), so b (it needs a) and c do too.
    let edited = s.compile("chain-v2.yaml", &edited_chain());
    let (third, output) = s.rerun(&first.id, "c", Some(&edited)).await;
    assert_eq!(s.server.count(), 8, "{:?}", prompts(&s.server, 5));
    assert_eq!(output, json!("ALPHA2+BETA+GAMMA"));
    let events = s.events(&third).await;
    assert!(reused(&events).is_empty(), "{events:#?}");
    assert_eq!(started(&events), ["a", "b", "c"]);
    assert!(prompts(&s.server, 5)[1].contains("expand ALPHA2"));

    // A rerun of a rerun: a comes from the second run's reuse (with the
    // original call on record), b from its own call; only c is asked.
    let (fourth, output) = s.rerun(&second, "c", None).await;
    assert_eq!(s.server.count(), 9);
    assert_eq!(output, json!("ALPHA+BETA+GAMMA"));
    let events = s.events(&fourth).await;
    let second_events = s.events(&second).await;
    assert_eq!(
        reused(&events),
        [
            ("a", second.as_str(), output_of(&original, "a"), 1),
            ("b", second.as_str(), output_of(&second_events, "b"), 1)
        ]
    );
    assert_eq!(started(&events), ["c"]);
    s.stop().await;
}

#[tokio::test]
async fn reused_calls_do_not_count_against_the_token_budget() {
    let s = Setup::new("rerun-budget").await;
    answer_per_step(&s.server);
    // 20 tokens a call: c would start at 40, beyond 30.
    let budgeted = CHAIN.replace("name: chain\n", "name: chain\nlimits: {llm_tokens: 30}\n");
    let def = s.compile("chain.yaml", &budgeted);
    let first = s.engine.run(&def, json!({"topic": "rust"})).await.unwrap();
    assert_eq!(first.status, RunStatus::Failed);
    assert_eq!(first.error.unwrap().code, "budget_exceeded");
    assert_eq!(s.server.count(), 2);
    // A failed run can be re-run; a and b cost the new run nothing.
    let (_, output) = s.rerun(&first.id, "c", None).await;
    assert_eq!(output, json!("ALPHA+BETA+GAMMA"));
    assert_eq!(s.server.count(), 3);
    s.stop().await;
}

const TRIAGE: &str = r#"
name: triage
steps:
  - id: triage
    kind: decide
    with:
      prompt: "task-triage: {{ input.text }}"
      choices:
        refund: The customer wants their money back.
        bug: Something is broken.
  - {id: refund, kind: transform, needs: [triage.refund], with: {value: refund}}
  - {id: bug, kind: transform, needs: [triage.bug], with: {value: bug}}
  - id: reply
    kind: llm
    needs: [refund, bug]
    join: any
    with: {prompt: "task-reply: answer a {{ steps.triage.output.choice }} ticket"}
output: "{{ steps.triage.output.choice }}: {{ steps.reply.output.text }}"
"#;

fn decision(choice: &str) -> Reply {
    Reply::json(json!({"choice": choice, "rationale": "r", "confidence": 0.9})).when("task-triage")
}

#[tokio::test]
async fn a_reused_decision_keeps_its_path() {
    let s = Setup::new("rerun-decide").await;
    s.server.always(Reply::text("REPLY").when("task-reply"));
    s.server.script(decision("bug"));
    let def = s.compile("triage.yaml", TRIAGE);
    let first = s.engine.run(&def, json!({"text": "it crashes"})).await.unwrap();
    assert_eq!(first.output, Some(json!("bug: REPLY")), "{:?}", first.error);
    assert_eq!(s.server.count(), 2);
    // Asked again, the model would now say refund: it is not asked.
    s.server.script(decision("refund"));

    let (second, output) = s.rerun(&first.id, "reply", None).await;
    assert_eq!(output, json!("bug: REPLY"));
    assert_eq!(s.server.count(), 3);
    assert_eq!(prompts(&s.server, 2), ["task-reply: answer a bug ticket"]);
    let events = s.events(&second).await;
    let ids: Vec<&str> = reused(&events).iter().map(|r| r.0).collect();
    assert_eq!(ids, ["triage", "bug"]);
    // The path not taken is skipped again, from the reused decision.
    assert!(events.iter().any(|e| matches!(e, Event::StepSkipped { step, .. } if step == "refund")));
    assert_eq!(started(&events), ["reply"]);
    let steps = report::steps(&journal(&s.store, &second).await);
    assert_eq!(steps[0].decision.as_ref().map(|d| d.choice.as_str()), Some("bug"));
    assert_eq!(steps[0].status, "reused");

    // From the step on the chosen path: it runs again, on that path.
    let (third, output) = s.rerun(&first.id, "bug", None).await;
    assert_eq!(output, json!("bug: REPLY"));
    assert_eq!(s.server.count(), 4);
    let events = s.events(&third).await;
    let ids: Vec<&str> = reused(&events).iter().map(|r| r.0).collect();
    assert_eq!(ids, ["triage"]);
    assert_eq!(started(&events), ["bug", "reply"]);
    s.stop().await;
}

#[tokio::test]
async fn an_unknown_step_or_run_and_an_unfinished_run_are_refused() {
    let s = Setup::new("rerun-errors").await;
    answer_per_step(&s.server);
    let def = s.compile("chain.yaml", CHAIN);
    let first = s.engine.run(&def, json!({"topic": "rust"})).await.unwrap();
    match s.engine.rerun(&first.id, "nope", None).await {
        Err(EngineError::InvalidInput(errors)) => {
            assert_eq!(errors.len(), 1);
            assert!(errors[0].contains("no step \"nope\"") && errors[0].contains("a, b, c"), "{errors:?}");
        }
        other => panic!("{other:?}"),
    }
    // The step must exist in the edited file, not only in the original.
    let renamed = s.compile("renamed.yaml", &CHAIN.replace("id: c", "id: d").replace("steps.c.", "steps.d."));
    assert!(matches!(s.engine.rerun(&first.id, "c", Some(&renamed)).await, Err(EngineError::InvalidInput(_))));
    assert!(matches!(s.engine.rerun("no-such-run", "a", None).await, Err(EngineError::NotFound(_))));

    let gate = s.compile("gate.yaml", "name: gate\nsteps:\n  - {id: gate, kind: wait, with: {signal: go}}\n");
    let waiting = s.engine.submit(&gate, json!({})).await.unwrap();
    assert_eq!(s.engine.wait_settled(&waiting).await.unwrap().status, RunStatus::Waiting);
    match s.engine.rerun(&waiting, "gate", None).await {
        Err(EngineError::Conflict(message)) => assert_eq!(message, format!("run {waiting} is still waiting")),
        other => panic!("{other:?}"),
    }
    // Nothing was started by the refusals.
    assert_eq!(s.server.count(), 3);
    assert_eq!(s.store.runs(None, false, 100).await.unwrap().len(), 2);
    s.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");

#[tokio::test]
async fn the_cli_reruns_from_a_step_against_a_model_server() {
    let server = ModelServer::start().await;
    answer_per_step(&server);
    let dir = temp_dir("rerun-cli");
    let db = dir.join("switchyard.db");
    let file = dir.join("chain.yaml");
    std::fs::write(&file, CHAIN).unwrap();
    let switchyard = || {
        let mut cmd = Command::new(BIN);
        cmd.arg("--db")
            .arg(&db)
            .env("SWITCHYARD_SQLITE_SYNC", "normal")
            .env("OPENAI_BASE_URL", server.base_url())
            .env("OPENAI_API_KEY", "sk-test")
            .kill_on_drop(true);
        cmd
    };
    let out = switchyard().arg("run").arg(&file).args(["--input", r#"{"topic": "rust"}"#]).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(server.count(), 3);
    let run = stderr.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap().to_owned();

    let out = switchyard().args(["runs", "rerun", &run, "--from", "b"]).output().await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(server.count(), 5);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!("ALPHA+BETA+GAMMA"));
    assert_eq!(stderr.lines().next(), Some(format!("reusing a from {run}").as_str()), "{stderr}");
    assert!(stderr.contains(&format!("(from {run})")) && stderr.contains("not paid again"), "{stderr}");
    let second = stderr.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).unwrap().to_owned();

    // `runs show`: the reused step, in text and JSON.
    let out = switchyard().args(["runs", "show", &second, "--json"]).output().await.unwrap();
    let detail: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(detail["steps"][0]["status"], "reused");
    assert_eq!(detail["steps"][0]["reused_from"], run.as_str());
    assert_eq!(detail["steps"][0]["llm"]["reused"], 1);
    assert_eq!(detail["steps"][0]["llm"]["calls"], 0);

    // An edited file: a changed, so everything runs.
    let edited = dir.join("chain-v2.yaml");
    std::fs::write(&edited, edited_chain()).unwrap();
    let out = switchyard().args(["runs", "rerun", &run, "--from", "c", "--file"]).arg(&edited).output().await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(server.count(), 8);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!("ALPHA2+BETA+GAMMA"));
    assert!(stderr.starts_with(&format!("reusing no step from {run}\n")), "{stderr}");

    // Bad step, run or file: exit 2, one line, nothing sent.
    for args in [vec!["runs", "rerun", &run, "--from", "nope"], vec!["runs", "rerun", "nope", "--from", "b"]] {
        let out = switchyard().args(&args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains("nope"), "{stderr}");
    }
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "name: x\nsteps: [\n").unwrap();
    let out = switchyard().args(["runs", "rerun", &run, "--from", "b", "--file"]).arg(&broken).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.count(), 8);
    server.stop().await;
}
