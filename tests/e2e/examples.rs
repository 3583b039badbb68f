//! Every example in workflows/ compiles, and each one runs for real: on an
//! engine over a fresh SQLite file, with `http` steps pointed at a local
//! [`CounterServer`] on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_integrations::http::ReqwestHttp;
use switchyard_orchestrator::compile::compile_file;
use switchyard_orchestrator::engine::Error as EngineError;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::store::{SqliteOptions, SqliteStore};
use switchyard_orchestrator::{Engine, EngineOptions, RunOutcome};
use switchyard_steps::{Registry, SystemClock};
use switchyard_tests::{CounterServer, ModelServer, Reply, TempDir};

/// Far above what any example takes (the slowest sleeps 1s).
const RUN_LIMIT: Duration = Duration::from_secs(30);

fn examples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../workflows"))
}

fn registry() -> Registry {
    switchyard_tests::install_crypto_provider();
    switchyard_orchestrator::registry(
        Arc::new(ReqwestHttp::new().expect("http client")),
        Arc::new(switchyard_steps::llm::NoModels),
    )
}

/// An engine on the real clock over a SQLite file in its own temp dir.
struct Examples {
    engine: Engine,
    registry: Registry,
    _dir: TempDir,
}

impl Examples {
    async fn start() -> Self {
        Self::on(registry()).await
    }

    /// With the model provider `default` on a local model server.
    async fn with_model(model: &ModelServer) -> Self {
        Self::on(crate::support::model_registry(model, Default::default())).await
    }

    async fn on(registry: Registry) -> Self {
        let dir = switchyard_tests::temp_dir("examples");
        let url = dir.join("db.sqlite").display().to_string();
        let store =
            Arc::new(SqliteStore::open(&SqliteOptions { url, synchronous_full: false }).await.expect("open store"));
        let engine = Engine::start(store, registry.clone(), Arc::new(SystemClock), EngineOptions::default());
        Self { engine, registry, _dir: dir }
    }

    /// Compiles `workflows/{file}` and runs it to its end.
    async fn run(&self, file: &str, input: Value) -> Result<RunOutcome, EngineError> {
        let path = examples_dir().join(file);
        let def = compile_file(&path, &self.registry).unwrap_or_else(|e| panic!("{file} does not compile:\n{e}"));
        // A guard, not a wait: a run that hangs fails the test instead of
        // stalling the whole suite.
        tokio::time::timeout(RUN_LIMIT, self.engine.run(&def, input))
            .await
            .unwrap_or_else(|_| panic!("{file} did not finish within {RUN_LIMIT:?}"))
    }

    /// Runs `file` and asserts that it succeeded.
    async fn succeed(&self, file: &str, input: Value) -> RunOutcome {
        let outcome = self.run(file, input).await.expect("run");
        assert_eq!(outcome.status, RunStatus::Succeeded, "{file} did not succeed: {:?}", outcome.error);
        outcome
    }

    async fn journal(&self, run: &str) -> Vec<Event> {
        let entries = self.engine.store().journal(run).await.expect("journal");
        entries.into_iter().map(|e| e.event).collect()
    }

    async fn stop(self) {
        self.engine.shutdown().await;
    }
}

fn workflow_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json"))
        .collect();
    files.sort();
    files
}

/// Maps each call's `Idempotency-Key` to the value of query parameter `key`.
fn query_by_idempotency_key(calls: &[switchyard_tests::Call], key: &str) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> = calls
        .iter()
        .map(|c| {
            (
                c.idempotency_key.clone().expect("an Idempotency-Key header"),
                c.query.get(key).cloned().unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    seen
}

#[test]
fn every_example_compiles() {
    let registry = registry();
    let files = workflow_files(&examples_dir());
    assert!(files.len() >= 4, "expected at least 4 examples in workflows/, found {files:?}");
    let errors: Vec<String> = files
        .iter()
        .filter_map(|path| match compile_file(path, &registry) {
            Err(e) => Some(format!("{}:\n{e}", path.display())),
            Ok(def) if def.workflow.description().trim().is_empty() => {
                Some(format!("{}: has no description", path.display()))
            }
            Ok(_) => None,
        })
        .collect();
    assert!(errors.is_empty(), "examples with problems:\n{}", errors.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_enrichment_pages_critical_incidents_after_retrying_the_catalog() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    let input = json!({
        "service": "checkout",
        "severity": "critical",
        "title": "checkout 5xx above 5%",
        "base_url": server.url(""),
        // The catalog answers 503 once; the step's retry policy gets past it.
        "catalog_url": server.url("/hit/owners?fail_first=1"),
    });
    let outcome = examples.succeed("incident-enrichment.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({
            "service": "checkout",
            "action": "page",
            "team": "unowned",
            "text": "[CRITICAL] checkout: paged the on-call for team unowned",
            "notified_status": 200,
        }))
    );

    let owners = server.calls_to("owners");
    assert_eq!(owners.len(), 2, "one failed attempt, one retry: {owners:?}");
    let owners_key = format!("{}/owners", outcome.id);
    for call in &owners {
        assert_eq!(call.method, "GET");
        assert_eq!(call.query.get("service").map(String::as_str), Some("checkout"));
        assert_eq!(call.idempotency_key.as_deref(), Some(owners_key.as_str()));
    }
    let page = server.calls_to("page");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].method, "POST");
    assert_eq!(
        page[0].body,
        json!({
            "service": "checkout",
            "severity": "critical",
            "team": "unowned",
            "summary": "checkout 5xx above 5%",
        })
    );
    assert_eq!(server.count("ticket"), 0);

    let journal = examples.journal(&outcome.id).await;
    assert!(
        journal.iter().any(|e| matches!(e,
            Event::StepSkipped { step, .. } if step == "ticket")),
        "the ticket branch is skipped: {journal:?}"
    );
    examples.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_enrichment_files_tickets_for_lower_severities() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    let input = json!({"service": "payments", "severity": "high", "base_url": server.url("")});
    let outcome = examples.succeed("incident-enrichment.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({
            "service": "payments",
            "action": "ticket",
            "team": "unowned",
            "text": "[HIGH] payments: filed a ticket for team unowned",
            "notified_status": 200,
        }))
    );
    assert_eq!(server.count("owners"), 1);
    assert_eq!(server.count("page"), 0);
    let ticket = server.calls_to("ticket");
    assert_eq!(ticket.len(), 1);
    assert_eq!(
        ticket[0].body,
        json!({
            "service": "payments",
            "team": "unowned",
            "priority": "P2",
            "summary": "payments is degraded",
        })
    );
    assert_eq!(ticket[0].idempotency_key, Some(format!("{}/ticket", outcome.id)));
    examples.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_enrichment_rejects_an_unknown_severity_before_calling_anything() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    let input = json!({"service": "payments", "severity": "sev1", "base_url": server.url("")});
    match examples.run("incident-enrichment.yaml", input).await {
        Err(EngineError::InvalidInput(errors)) => {
            assert!(errors.iter().any(|e| e.starts_with("input/severity")), "{errors:?}");
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
    assert!(server.calls().is_empty());
    examples.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fanout_checks_every_host_once_and_reports_in_host_order() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    let hosts = ["web-1", "web-2", "web-3", "db-1", "db-2", "cache-1"];
    let input = json!({"hosts": hosts, "base_url": server.url("")});
    let outcome = examples.succeed("host-fanout.yaml", input).await;

    let verdicts: Vec<Value> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| json!({"host": host, "position": i, "healthy": true, "http_status": 200, "error": null}))
        .collect();
    assert_eq!(
        outcome.output,
        Some(json!({
            "hosts": verdicts,
            "checked": hosts.len(),
            "healthy": hosts,
            "unhealthy": [],
        }))
    );

    // One call per host, each from the child run of that host's index.
    let calls = server.calls_to("check");
    assert_eq!(calls.len(), hosts.len(), "{calls:?}");
    let mut expected: Vec<(String, String)> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| (format!("{}/check/{i}/probe", outcome.id), host.to_string()))
        .collect();
    expected.sort();
    assert_eq!(query_by_idempotency_key(&calls, "host"), expected);
    assert!(server.max_in_flight() <= 4, "map concurrency is 4, saw {}", server.max_in_flight());
    examples.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_fanout_reports_failed_checks_as_unhealthy_without_failing() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    // No route answers under /down: every check gets a 404, which is not retried.
    let input = json!({"hosts": ["web-1", "web-2"], "base_url": server.url("/down")});
    let outcome = examples.succeed("host-fanout.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({
            "hosts": [
                {"host": "web-1", "position": 0, "healthy": false, "http_status": null, "error": "http_404"},
                {"host": "web-2", "position": 1, "healthy": false, "http_status": null, "error": "http_404"},
            ],
            "checked": 2,
            "healthy": [],
            "unhealthy": ["web-1", "web-2"],
        }))
    );
    examples.stop().await;
    server.stop().await;
}

fn section(name: &str, availability: f64, incidents: u32, critical: u32) -> Value {
    json!({
        "name": name,
        "availability": availability,
        "slo_target": 99.9,
        "incidents": incidents,
        "critical": critical,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightly_report_flags_a_breach_and_still_reports() {
    let examples = Examples::start().await;
    let input = json!({
        "date": "2025-06-01",
        "sections": [section("payments", 99.95, 1, 0), section("search", 99.5, 3, 1)],
    });
    let outcome = examples.succeed("nightly-report.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({
            "title": "Nightly ops report for 2025-06-01",
            "overall": "red",
            "lines": [
                "RED fleet: 99.5% vs SLO 99.9%, 500.0% of error budget used, 4 incidents (1 critical)",
                "GREEN payments: 99.95% vs SLO 99.9%, 50.0% of error budget used, 1 incidents (0 critical)",
                "RED search: 99.5% vs SLO 99.9%, 500.0% of error budget used, 3 incidents (1 critical)",
            ],
            "breaches": ["search"],
            "gate": "SLO breached by search",
        }))
    );
    let journal = examples.journal(&outcome.id).await;
    assert!(
        journal.iter().any(|e| matches!(e,
            Event::StepFailed { step, continued: true, error, .. }
                if step == "slo_gate" && error.code == "slo_breach")),
        "the gate failed and the run went on: {journal:?}"
    );
    examples.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightly_report_skips_the_gate_when_every_slo_is_met() {
    let examples = Examples::start().await;
    let input = json!({
        "date": "2025-06-02",
        "sections": [section("payments", 99.95, 1, 0), section("search", 99.92, 2, 1)],
    });
    let outcome = examples.succeed("nightly-report.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({
            "title": "Nightly ops report for 2025-06-02",
            "overall": "amber",
            "lines": [
                "AMBER fleet: 99.92% vs SLO 99.9%, 80.0% of error budget used, 3 incidents (1 critical)",
                "GREEN payments: 99.95% vs SLO 99.9%, 50.0% of error budget used, 1 incidents (0 critical)",
                "AMBER search: 99.92% vs SLO 99.9%, 80.0% of error budget used, 2 incidents (1 critical)",
            ],
            "breaches": [],
            "gate": "passed",
        }))
    );
    let journal = examples.journal(&outcome.id).await;
    assert!(
        journal.iter().any(|e| matches!(e,
            Event::StepSkipped { step, .. } if step == "slo_gate")),
        "`when` is false, so the gate is skipped: {journal:?}"
    );
    examples.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminder_waits_its_cooldown_then_reminds() {
    let examples = Examples::start().await;
    let input = json!({"channel": "#ops", "message": "rotate the TLS cert", "mention": "alice"});
    let started = Instant::now();
    let outcome = examples.succeed("reminder.yaml", input).await;
    let took = started.elapsed();
    assert_eq!(outcome.output, Some(json!({"channel": "#ops", "text": "@alice Reminder: rotate the TLS cert"})));
    // The file sleeps 1s: the run must have waited (no upper bound: this is
    // not a timing test).
    assert!(took >= Duration::from_secs(1), "finished after {took:?}");
    let journal = examples.journal(&outcome.id).await;
    assert!(
        journal.iter().any(|e| matches!(e,
            Event::StepSuspended { step, .. } if step == "cooldown")),
        "the sleep is journaled: {journal:?}"
    );
    examples.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_triage_files_a_bug_and_sends_unsure_tickets_to_people() {
    let server = CounterServer::start().await;
    let model = ModelServer::start().await;
    let examples = Examples::with_model(&model).await;
    let input = |subject: &str| json!({"subject": subject, "body": "details", "base_url": server.url("")});
    model.script(Reply::json(json!({"choice": "bug", "rationale": "The app crashes.", "confidence": 0.95})));
    let outcome = examples.succeed("ticket-triage.yaml", input("App crashes at login")).await;
    assert_eq!(
        outcome.output,
        Some(json!({"queue": "bug", "confidence": 0.95, "rationale": "The app crashes.", "fallback": null}))
    );
    assert_eq!((server.count("bugs"), server.count("refunds"), server.count("queue")), (1, 0, 0));
    assert_eq!(server.calls_to("bugs")[0].body["title"], "App crashes at login");
    let sent = &model.requests()[0];
    // The two examples go first, as turns, then the ticket.
    assert_eq!(sent.messages().len(), 6);
    assert!(sent.last_user_message().unwrap().starts_with("Subject: App crashes at login"));

    // Unsure: below 0.7 it goes to the human queue, saying why.
    model.script(Reply::json(json!({"choice": "refund", "rationale": "Maybe.", "confidence": 0.4})));
    let outcome = examples.succeed("ticket-triage.yaml", input("Hmm")).await;
    assert_eq!(outcome.output.unwrap()["fallback"], "low_confidence");
    assert_eq!((server.count("refunds"), server.count("queue")), (0, 1));
    assert_eq!(server.calls_to("queue")[0].body["why"], "low_confidence");
    examples.stop().await;
    model.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_summary_returns_a_validated_summary() {
    let model = ModelServer::start().await;
    let examples = Examples::with_model(&model).await;
    let summary = json!({
        "title": "Checkout database connections exhausted",
        "severity": "high",
        "probable_cause": "A connection leak after the 14:02 deploy.",
        "next_steps": ["Roll back the 14:02 deploy", "Raise the pool limit"],
    });
    // The first answer misses a field: it is re-asked with the error.
    model.script_all([Reply::json(json!({"title": "x", "severity": "high"})), Reply::json(summary.clone())]);
    let input = json!({"service": "checkout", "log": ["14:03 pool exhausted", "14:04 timeouts"]});
    let outcome = examples.succeed("incident-summary.yaml", input).await;
    assert_eq!(outcome.output, Some(summary));
    let requests = model.requests();
    assert!(requests[0].last_user_message().unwrap().contains("14:03 pool exhausted\n14:04 timeouts"));
    assert!(requests[1].last_user_message().unwrap().contains("probable_cause"));
    examples.stop().await;
    model.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oncall_agent_reads_alerts_and_deploys_then_pages_through_its_workflow_tool() {
    let server = CounterServer::start().await;
    let model = ModelServer::start().await;
    let examples = Examples::with_model(&model).await;
    model.script_all([
        Reply::tool_calls(vec![
            ("get_alerts", json!({"service": "checkout"})),
            ("get_deploys", json!({"service": "checkout"})),
        ]),
        Reply::tool_calls(vec![(
            "page_owner",
            json!({"service": "checkout", "message": "5xx since the 14:02 deploy"}),
        )]),
        Reply::json(json!({"summary": "5xx since the 14:02 deploy; paged the owners.", "paged": true})),
    ]);
    let input = json!({"service": "checkout", "base_url": server.url("")});
    let outcome = examples.succeed("oncall-agent.yaml", input).await;
    assert_eq!(
        outcome.output,
        Some(json!({"summary": "5xx since the 14:02 deploy; paged the owners.", "paged": true}))
    );
    assert_eq!((server.count("alerts"), server.count("deploys"), server.count("page")), (1, 1, 1));
    assert_eq!(server.calls_to("page")[0].body, json!({"service": "checkout", "text": "5xx since the 14:02 deploy"}));
    // The model sees the page workflow's input schema without the bound base_url.
    let tools = &model.requests()[0].body["tools"];
    let page = tools.as_array().unwrap().iter().find(|t| t["function"]["name"] == "page_owner").unwrap();
    assert_eq!(page["function"]["parameters"]["required"], json!(["service", "message"]));
    assert!(page["function"]["parameters"]["properties"].get("base_url").is_none());
    let child = examples.engine.store().run(&format!("{}/investigate/tool/2", outcome.id)).await.unwrap();
    assert_eq!(child.expect("the page child run").output, Some(json!({"paged": true, "status": 200})));
    examples.stop().await;
    model.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oncall_page_runs_on_its_own() {
    let server = CounterServer::start().await;
    let examples = Examples::start().await;
    let input = json!({"service": "checkout", "message": "hello", "base_url": server.url("")});
    let outcome = examples.succeed("oncall-page.yaml", input).await;
    assert_eq!(outcome.output, Some(json!({"paged": true, "status": 200})));
    examples.stop().await;
    server.stop().await;
}
