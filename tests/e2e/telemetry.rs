//! Telemetry of the `switchyard` binary against a real OTLP/HTTP receiver
//! on loopback: the spans of a run (parents, GenAI attributes, decisions,
//! HTTP client spans, map children), content left off unless asked for,
//! W3C trace context in and out, no second span for replayed work after a
//! SIGKILL, a receiver that is down, and Prometheus metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_integrations::llm::Limits;
use switchyard_observability::Telemetry;
use switchyard_orchestrator::EngineOptions;
use switchyard_orchestrator::journal::RunStatus;
use switchyard_steps::SystemClock;
use switchyard_tests::{CounterServer, ModelServer, OtlpReceiver, ReceivedSpan, Reply, temp_dir};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::ModelSetup;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");
const LIMIT: Duration = Duration::from_secs(60);

/// The caller's span of the `--traceparent` tests.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn switchyard(db: &Path, receiver: &str, model: &ModelServer) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db")
        .arg(db)
        .env("SWITCHYARD_SQLITE_SYNC", "normal")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver)
        .env("OTEL_BSP_SCHEDULE_DELAY", "20")
        .env("OTEL_METRICS_EXPORTER", "none")
        .env("OPENAI_BASE_URL", model.base_url())
        .env("OPENAI_API_KEY", "sk-telemetry-canary-key")
        .env("SWITCHYARD_LLM_MODEL", "test-model")
        .env_remove("SWITCHYARD_OTEL_CAPTURE_CONTENT")
        .env_remove("OTEL_TRACES_SAMPLER")
        .kill_on_drop(true);
    cmd
}

async fn output_within(cmd: &mut Command) -> std::process::Output {
    match tokio::time::timeout(LIMIT, cmd.output()).await {
        Ok(out) => out.expect("the binary starts"),
        Err(_) => panic!("{cmd:?} did not end within {LIMIT:?}"),
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found = named(spans, name);
    assert_eq!(
        found.len(),
        1,
        "exactly one span {name:?}; got {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// Every span's parent is in the trace (or is the caller's span `caller`).
fn assert_tree(spans: &[ReceivedSpan], caller: &str) {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "span ids are unique: {spans:#?}");
    for s in spans {
        assert!(
            s.parent_id.is_empty() || s.parent_id == caller || ids.contains(s.parent_id.as_str()),
            "{} ({}) has a parent that was never reported: {spans:#?}",
            s.name,
            s.span_id
        );
    }
}

/// Every name, attribute value and status message of every span, for leak
/// checks.
fn all_text(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .flat_map(|s| {
            let attrs = s.attributes.iter().map(|(k, v)| format!("{k}={v}\n"));
            attrs.chain([format!("name={}\nstatus={}\n", s.name, s.status_message)])
        })
        .collect()
}

fn traced_workflow(counter: &CounterServer) -> String {
    format!(
        r#"
name: traced
steps:
  - id: fetch
    kind: http
    with:
      url: "{base}/hit/fetch?api_token=QUERY-CANARY"
  - id: triage
    kind: decide
    needs: [fetch]
    with:
      prompt: "Ticket: PROMPT-CANARY {{{{ input.text }}}}"
      choices:
        refund: The customer wants their money back.
        bug: Something is broken.
  - id: summary
    kind: llm
    needs: [triage.bug]
    with:
      prompt: "Summarise PROMPT-CANARY"
  - id: fan
    kind: map
    needs: [fetch]
    with:
      items: [1, 2]
      steps:
        - id: double
          kind: transform
          with: {{value: "{{{{ input.item * 2 }}}}"}}
"#,
        base = counter.url("")
    )
}

#[tokio::test]
async fn a_runs_spans_reach_the_receiver_with_parents_genai_attributes_and_trace_context() {
    switchyard_tests::install_crypto_provider();
    let dir = temp_dir("otel-run");
    let (receiver, model, counter) =
        (OtlpReceiver::start().await, ModelServer::start().await, CounterServer::start().await);
    model.script_all([
        Reply::json(json!({"choice": "bug", "confidence": 0.92, "rationale": "RATIONALE-CANARY it crashes"}))
            .usage(30, 7),
        Reply::text("ANSWER-CANARY all good").usage(20, 5),
    ]);
    let file = dir.join("traced.yaml");
    std::fs::write(&file, traced_workflow(&counter).replace("{base}", "")).unwrap();
    let out = output_within(
        switchyard(&dir.join("db"), &receiver.endpoint(), &model)
            .arg("run")
            .arg(&file)
            .arg("--input")
            .arg(r#"{"text": "the app crashes"}"#)
            .arg("--traceparent")
            .arg(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = receiver.spans();
    let by_id: BTreeMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "span ids are unique");
    assert_tree(&spans, CALLER_SPAN);

    // One trace: the caller's. The run span hangs under the caller's span.
    assert!(spans.iter().all(|s| s.trace_id == CALLER_TRACE), "one trace");
    assert!(spans.iter().all(|s| s.service == "switchyard"));
    let run = one(&spans, "invoke_workflow traced");
    assert_eq!(run.parent_id, CALLER_SPAN);
    assert_eq!(run.kind, 1, "internal");
    assert_eq!(run.attr("gen_ai.operation.name"), Some("invoke_workflow"));
    assert_eq!(run.attr("gen_ai.workflow.name"), Some("traced"));
    assert_eq!(run.attr("switchyard.run.status"), Some("succeeded"));
    assert_eq!(run.attr("switchyard.workflow.version"), Some("1"));
    assert!(run.attr("switchyard.run.id").is_some_and(|id| !id.is_empty()));

    // One span per step attempt, under the run: a step with one attempt
    // needs no span of its own to group its attempts.
    for step in ["fetch", "triage", "summary", "fan"] {
        let attempts: Vec<_> = spans.iter().filter(|a| a.attr("switchyard.step.id") == Some(step)).collect();
        assert_eq!(attempts.len(), 1, "one span for {step}");
        let a = attempts[0];
        assert_eq!(a.parent_id, run.span_id, "{step} under the run");
        assert_eq!(a.attr("switchyard.step.attempt"), Some("1"));
        assert_eq!(a.attr("switchyard.step.attempts"), Some("1"));
        assert_eq!(a.attr("switchyard.step.status"), Some("succeeded"));
        assert_eq!(a.attr("gen_ai.workflow.name"), Some("traced"));
    }
    assert!(named(&spans, "step fetch").is_empty());

    // The http step is an HTTP client span; its URL has no query.
    let get = one(&spans, "GET");
    assert_eq!(get.kind, 3, "client");
    assert_eq!(get.attr("http.request.method"), Some("GET"));
    assert_eq!(get.attr("url.full"), Some(counter.url("/hit/fetch").as_str()));
    assert_eq!(get.attr("http.response.status_code"), Some("200"));
    // ... and the request carried its span as `traceparent`.
    let call = &counter.calls_to("fetch")[0];
    assert_eq!(call.headers.get("traceparent"), Some(&format!("00-{CALLER_TRACE}-{}-01", get.span_id)));

    // The decision, on the decide attempt's span.
    let decide = one(&spans, "decide triage");
    assert_eq!(decide.attr("switchyard.decision.choice"), Some("bug"));
    assert_eq!(decide.attr("switchyard.decision.confidence"), Some("0.92"));
    assert_eq!(decide.attr("switchyard.decision.fallback_used"), Some("false"));

    // Model calls: `chat {model}` client spans under their attempts.
    let chats = named(&spans, "chat test-model");
    assert_eq!(chats.len(), 2, "one chat span per model call");
    let decide_chat = chats.iter().find(|c| c.parent_id == decide.span_id).expect("the decide's call");
    assert_eq!(decide_chat.kind, 3);
    assert_eq!(decide_chat.attr("gen_ai.operation.name"), Some("chat"));
    assert_eq!(decide_chat.attr("gen_ai.provider.name"), Some("openai"));
    assert_eq!(decide_chat.attr("gen_ai.request.model"), Some("test-model"));
    assert_eq!(decide_chat.attr("gen_ai.response.model"), Some("test-model"));
    assert_eq!(decide_chat.attr("gen_ai.response.finish_reasons"), Some("stop"));
    assert_eq!(decide_chat.attr("gen_ai.usage.input_tokens"), Some("30"));
    assert_eq!(decide_chat.attr("gen_ai.usage.output_tokens"), Some("7"));
    assert_eq!(decide_chat.attr("server.address"), Some("127.0.0.1"));
    assert!(decide_chat.attr("server.port").is_some());
    let llm = one(&spans, "llm summary");
    let llm_chat = chats.iter().find(|c| c.parent_id == llm.span_id).expect("the llm's call");
    assert_eq!(llm_chat.attr("gen_ai.usage.output_tokens"), Some("5"));
    // Model requests carried the trace.
    for request in model.requests() {
        let tp = request.headers.get("traceparent").expect("a model request carries traceparent");
        assert!(tp.starts_with(&format!("00-{CALLER_TRACE}-")), "{tp}");
    }

    // A map's children are runs under the map's attempt.
    let map = one(&spans, "map fan");
    let children: Vec<_> = spans.iter().filter(|s| s.parent_id == map.span_id).collect();
    assert_eq!(children.len(), 2, "two child runs under the map attempt");
    for child in children {
        assert!(child.name.starts_with("invoke_workflow "), "{}", child.name);
        let steps: Vec<_> = spans.iter().filter(|s| s.parent_id == child.span_id).collect();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].name, "transform double");
    }

    // Content is off by default: no prompt, answer, rationale, query or key.
    let text = all_text(&spans);
    for canary in ["PROMPT-CANARY", "ANSWER-CANARY", "RATIONALE-CANARY", "QUERY-CANARY", "sk-telemetry-canary-key"] {
        assert!(!text.contains(canary), "{canary} leaked onto a span:\n{text}");
    }
    assert!(!text.contains("/op/"), "no idempotency keys on spans");
    for s in &spans {
        assert!(s.start_ns <= s.end_ns, "{} ends after it starts", s.name);
    }
    receiver.stop().await;
    model.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn content_goes_on_spans_only_when_asked_and_never_credentials() {
    switchyard_tests::install_crypto_provider();
    let dir = temp_dir("otel-content");
    let (receiver, model, counter) =
        (OtlpReceiver::start().await, ModelServer::start().await, CounterServer::start().await);
    model.always(Reply::text("ANSWER-CANARY fine"));
    let file = dir.join("c.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
name: content
steps:
  - id: ask
    kind: llm
    with:
      prompt: "PROMPT-CANARY {{{{ input.q }}}}"
  - id: post
    kind: http
    needs: [ask]
    with:
      method: POST
      url: "{}"
      headers: {{Authorization: "Bearer HEADER-CANARY"}}
      json: {{text: "{{{{ steps.ask.output.text }}}}"}}
"#,
            counter.url("/hit/post")
        ),
    )
    .unwrap();
    let out = output_within(
        switchyard(&dir.join("db"), &receiver.endpoint(), &model)
            .env("SWITCHYARD_OTEL_CAPTURE_CONTENT", "true")
            .arg("run")
            .arg(&file)
            .arg("--input")
            .arg(r#"{"q": "why"}"#),
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = receiver.spans();
    let chat = one(&spans, "chat test-model");
    assert!(chat.attr("gen_ai.output.messages").is_some_and(|m| m.contains("ANSWER-CANARY")), "{chat:?}");
    let ask = one(&spans, "llm ask");
    assert!(ask.attr("switchyard.step.input").is_some_and(|i| i.contains("PROMPT-CANARY why")), "{ask:?}");
    let text = all_text(&spans);
    assert!(!text.contains("HEADER-CANARY"), "a credential header leaked:\n{text}");
    assert!(!text.contains("sk-telemetry-canary-key"));
    // Without a caller's span, the trace id is the run id.
    let run = one(&spans, "invoke_workflow content");
    assert_eq!(run.parent_id, "");
    assert_eq!(run.trace_id, run.attr("switchyard.run.id").unwrap().replace('-', ""));
    receiver.stop().await;
    model.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn a_bad_traceparent_or_telemetry_setting_exits_2_naming_it() {
    let dir = temp_dir("otel-bad");
    let model = ModelServer::start().await;
    let file = dir.join("t.yaml");
    std::fs::write(&file, "name: t\nsteps:\n  - id: a\n    kind: transform\n    with: {value: 1}\n").unwrap();
    let out = output_within(
        switchyard(&dir.join("db"), "http://127.0.0.1:9", &model)
            .arg("run")
            .arg(&file)
            .arg("--traceparent")
            .arg("00-zz"),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("traceparent"));
    for (var, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
        ("SWITCHYARD_OTEL_CAPTURE_CONTENT", "yes please"),
        ("OTEL_SDK_DISABLED", "maybe"),
        ("SWITCHYARD_LOG_FORMAT", "xml"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://user:SECRET-PW@example.invalid"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url SECRET-PW"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
    ] {
        let out = output_within(
            switchyard(&dir.join("db"), "http://127.0.0.1:9", &model).env(var, value).arg("run").arg(&file),
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(!stderr.contains(value), "the value is not echoed: {stderr}");
    }
    // Disabled: nothing exported, the run works.
    let receiver = OtlpReceiver::start().await;
    let out = output_within(
        switchyard(&dir.join("db"), &receiver.endpoint(), &model)
            .env("OTEL_SDK_DISABLED", "true")
            .arg("run")
            .arg(&file),
    )
    .await;
    assert!(out.status.success());
    assert_eq!(receiver.received().requests, 0);
    receiver.stop().await;
    model.stop().await;
}

#[tokio::test]
async fn after_a_sigkill_the_resumed_spans_are_in_the_same_trace_and_nothing_completed_is_reported_twice() {
    switchyard_tests::install_crypto_provider();
    let dir = temp_dir("otel-kill");
    let (receiver, model, counter) =
        (OtlpReceiver::start().await, ModelServer::start().await, CounterServer::start().await);
    model.always(Reply::text("summary").usage(11, 3));
    let file = dir.join("k.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
name: killed
steps:
  - id: first
    kind: transform
    with: {{value: 1}}
  - id: think
    kind: llm
    needs: [first]
    with: {{prompt: "go"}}
  - id: call
    kind: http
    needs: [think]
    with: {{method: POST, url: "{}", json: {{a: 1}}}}
  - id: last
    kind: transform
    needs: [call]
    with: {{value: 2}}
"#,
            counter.url("/hit/call?hold_first=1")
        ),
    )
    .unwrap();
    let db = dir.join("db");
    let mut first = switchyard(&db, &receiver.endpoint(), &model)
        .env("SWITCHYARD_LEASE", "1s")
        .arg("run")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(first.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(LIMIT, stderr.next_line()).await.unwrap().unwrap().unwrap();
    let run_id = line.split_whitespace().nth(1).unwrap().to_owned();
    // The call is held; the spans of what finished before it have arrived.
    tokio::time::timeout(LIMIT, counter.wait_for_held("call")).await.unwrap();
    tokio::time::timeout(LIMIT, receiver.wait_until(|r| r.spans.iter().any(|s| s.name == "chat test-model")))
        .await
        .expect("the first process exported the finished steps' spans");
    first.start_kill().unwrap();
    let _ = first.wait().await;
    let before = receiver.spans().len();

    // A worker takes the run over once the lease has run out.
    let out = output_within(
        switchyard(&db, &receiver.endpoint(), &model)
            .env("SWITCHYARD_LEASE", "1s")
            .args(["worker", "--exit-when-idle"]),
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = receiver.spans();
    assert!(spans.len() > before);
    let trace = run_id.replace('-', "");
    assert!(spans.iter().all(|s| s.trace_id == trace), "one trace, the run's");
    // Completed work is not reported again.
    assert_eq!(named(&spans, "transform first").len(), 1);
    assert_eq!(named(&spans, "chat test-model").len(), 1, "the model call is not reported twice");
    assert_eq!(model.count(), 1, "nor made twice");
    // The interrupted attempt is reported by the process that went on, and
    // the new attempt links to it.
    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("switchyard.step.id") == Some("call") && s.attr("switchyard.step.attempt").is_some())
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let interrupted = attempts.iter().find(|a| a.attr("switchyard.step.status") == Some("interrupted")).unwrap();
    let retried = attempts.iter().find(|a| a.attr("switchyard.step.status") == Some("succeeded")).unwrap();
    // The next process does not know what the dead one sent: no method.
    assert_eq!((interrupted.name.as_str(), interrupted.attr("http.request.method")), ("HTTP", Some("_OTHER")));
    assert_eq!(interrupted.attr("switchyard.step.error.code"), Some("interrupted"));
    assert_eq!((retried.name.as_str(), retried.attr("http.request.method")), ("POST", Some("POST")));
    assert_tree(&spans, "");
    assert_eq!(interrupted.status, 2);
    assert_eq!(retried.links, vec![(trace.clone(), interrupted.span_id.clone())]);
    assert_eq!(interrupted.parent_id, retried.parent_id, "sibling attempts under one step span");
    let step = one(&spans, "step call");
    assert_eq!(step.span_id, retried.parent_id);
    let run = one(&spans, "invoke_workflow killed");
    assert_eq!(step.parent_id, run.span_id);
    assert_eq!(one(&spans, "transform first").parent_id, run.span_id, "spans from both processes share the run span");
    receiver.stop().await;
    model.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn with_the_receiver_down_runs_succeed_the_queue_stays_bounded_and_drops_are_counted() {
    switchyard_tests::install_crypto_provider();
    // A receiver that accepts connections and never answers: exports hang
    // until their timeout, the queue fills, spans are dropped.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let vars = BTreeMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "16".to_owned()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10".to_owned()),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
    ]);
    let telemetry = Telemetry::from_vars(|k| vars.get(k).cloned(), true).unwrap();
    assert!(telemetry.is_tracing());
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-down", Arc::new(SystemClock), Limits::default(), options).await;
    let steps: String = (0..40)
        .map(|i| {
            let needs = if i == 0 { String::new() } else { format!("\n    needs: [s{}]", i - 1) };
            format!("  - id: s{i}\n    kind: transform{needs}\n    with: {{value: {i}}}\n")
        })
        .collect();
    let def = setup.compile(&format!("name: chain\nsteps:\n{steps}"));
    for _ in 0..5 {
        let outcome = setup.engine.run(&def, json!({})).await.unwrap();
        assert_eq!(outcome.status, RunStatus::Succeeded);
    }
    // 5 runs x (40 steps + 1) spans, at most 16 queued + 8 in flight.
    let dropped = telemetry.dropped_spans();
    assert!(dropped >= 5 * 41 - 24, "dropped {dropped}");
    let text = telemetry.metrics().unwrap().prometheus_text().unwrap();
    let metrics = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let counted: f64 = metrics
        .samples
        .iter()
        .filter(|s| s.metric == "switchyard_spans_dropped_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(counted >= dropped as f64 - 1.0, "counter {counted} vs {dropped}");
    // Shutting down does not wait past its deadline for a hung receiver.
    let t = telemetry.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || t.shutdown(Duration::from_millis(300))).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
    setup.stop().await;
    holder.abort();
}

/// The metric names a Grafana dashboard's queries use.
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    // Label names (in `by (...)` and `{...}`) are not metrics.
                    let mut bare = String::new();
                    let mut rest = expr.as_str();
                    while let Some(start) = rest.find(['{', '(']) {
                        let group = rest[start..].starts_with('{') || rest[..start].trim_end().ends_with("by");
                        bare.push_str(&rest[..=start]);
                        rest = &rest[start + 1..];
                        if group {
                            let close = if bare.ends_with('{') { '}' } else { ')' };
                            rest = rest.find(close).map_or("", |end| &rest[end..]);
                        }
                    }
                    bare.push_str(rest);
                    for word in bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                        if word.starts_with("switchyard_") || word.starts_with("gen_ai_") {
                            out.insert(word.to_owned());
                        }
                    }
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

#[tokio::test]
async fn prometheus_text_parses_and_has_every_metric_the_dashboard_queries() {
    switchyard_tests::install_crypto_provider();
    let telemetry = Telemetry::from_vars(|_| None, true).unwrap();
    assert!(!telemetry.is_tracing(), "no endpoint, no span export");
    let prices =
        switchyard_orchestrator::report::Prices::parse(r#"{"test-model": {"input": 1, "output": 2}}"#).unwrap();
    let options = EngineOptions { telemetry: telemetry.clone(), prices: Arc::new(prices), ..Default::default() };
    let setup = ModelSetup::with_options("otel-prom", Arc::new(SystemClock), Limits::default(), options).await;
    setup.server.always(Reply::json(json!({"choice": "a", "confidence": 0.9, "rationale": "r"})).usage(100, 10));
    let def = setup.compile(
        "name: prom\nsteps:\n  - id: pick\n    kind: decide\n    with:\n      prompt: x\n      choices: {a: first, b: second}\n  - id: bad\n    kind: transform\n    needs: [pick]\n    retry: {max_attempts: 2, initial_delay: 1ms}\n    with: {value: \"{{ 1 / 0 }}\"}\n",
    );
    let outcome = setup.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let ok = setup.compile("name: fine\nsteps:\n  - id: t\n    kind: transform\n    with: {value: 1}\n");
    assert_eq!(setup.engine.run(&ok, json!({})).await.unwrap().status, RunStatus::Succeeded);

    let text = telemetry.metrics().unwrap().prometheus_text().unwrap();
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text");
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/switchyard.json")).unwrap(),
    )
    .unwrap();
    let wanted = dashboard_metrics(&dashboard);
    assert!(wanted.len() >= 10, "{wanted:?}");
    for metric in &wanted {
        // A histogram is queried by its series; the text has them all.
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| metric.strip_suffix(s)).unwrap_or(metric);
        assert!(
            names.contains(metric.as_str()) || names.contains(base),
            "the dashboard queries {metric}, which is not exported; have: {names:?}"
        );
    }
    // Labels are bounded: workflow names and statuses, never run ids.
    let finished: Vec<_> = scrape.samples.iter().filter(|s| s.metric == "switchyard_runs_finished_total").collect();
    let statuses: BTreeSet<String> =
        finished.iter().filter_map(|s| s.labels.get("switchyard_run_status").map(str::to_owned)).collect();
    assert_eq!(statuses, BTreeSet::from(["failed".to_owned(), "succeeded".to_owned()]));
    assert!(!text.contains("switchyard_run_id"), "no run ids as labels");
    let cost: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "switchyard_llm_cost_usd_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!((cost - 120.0 / 1_000_000.0).abs() < 1e-9, "cost {cost}; text:\n{text}");
    setup.stop().await;
}

#[tokio::test]
async fn the_worker_serves_prometheus_metrics() {
    let dir = temp_dir("otel-worker");
    let model = ModelServer::start().await;
    let mut worker = switchyard(&dir.join("db"), "http://127.0.0.1:9", &model)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .args(["worker", "--metrics-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(worker.stderr.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(LIMIT, stderr.next_line()).await.unwrap().unwrap().expect("a line");
        if let Some(url) = line.strip_prefix("metrics at ") {
            break url.to_owned();
        }
    };
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert!(scrape.samples.iter().any(|s| s.metric == "switchyard_runs_active"), "{text}");
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    model.stop().await;
}

#[tokio::test]
async fn runs_show_prints_a_timeline_and_its_json_matches_the_published_schema() {
    switchyard_tests::install_crypto_provider();
    let dir = temp_dir("otel-show");
    let (model, counter) = (ModelServer::start().await, CounterServer::start().await);
    model.always(Reply::json(json!({"choice": "bug", "confidence": 0.8, "rationale": "it crashes"})).usage(40, 9));
    let file = dir.join("s.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
name: shown
steps:
  - id: flaky
    kind: http
    retry: {{max_attempts: 3, initial_delay: 1ms}}
    with: {{url: "{}"}}
  - id: triage
    kind: decide
    needs: [flaky]
    with:
      prompt: "x"
      choices: {{refund: r, bug: b}}
  - id: fan
    kind: map
    needs: [flaky]
    with:
      items: [1, 2]
      steps:
        - id: double
          kind: transform
          with: {{value: "{{{{ input.item * 2 }}}}"}}
"#,
            counter.url("/hit/flaky?fail_first=1")
        ),
    )
    .unwrap();
    let db = dir.join("db");
    let plain = |cmd: &mut Command| {
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    };
    let mut run = switchyard(&db, "", &model);
    plain(&mut run);
    let out = output_within(run.arg("run").arg(&file)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr.split_whitespace().nth(1).unwrap().to_owned();

    let mut show = switchyard(&db, "", &model);
    plain(&mut show);
    let out = output_within(show.args(["runs", "show", &id])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("trace:    {}", id.replace('-', ""))), "{text}");
    assert!(text.contains("timeline: from "), "{text}");
    // Both attempts of the flaky step, with offsets, durations and bars.
    let attempt_lines: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with('#')).collect();
    assert!(
        attempt_lines.iter().any(|l| l.contains("#1") && l.contains("retrying") && l.contains("http_503")),
        "{text}"
    );
    assert!(attempt_lines.iter().any(|l| l.contains("#2") && l.contains("succeeded") && l.contains('█')), "{text}");
    assert!(text.contains("decided bug (confidence 0.80)"), "{text}");
    assert!(text.contains("rationale: it crashes"), "{text}");
    assert!(text.contains("40 in + 9 out tokens"), "{text}");
    assert!(text.contains("child fan/0"), "{text}");

    let mut show = switchyard(&db, "", &model);
    plain(&mut show);
    let out = output_within(show.args(["runs", "show", &id, "--json", "--journal"])).await;
    assert!(out.status.success());
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/run-detail.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> =
        validator.iter_errors(&detail).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "runs show --json does not match the schema: {errors:#?}");
    // The schema is strict: an unknown field or a missing one fails it.
    let mut extra = detail.clone();
    extra["steps"][0]["surprise"] = json!(1);
    assert!(!validator.is_valid(&extra));
    let mut missing = detail.clone();
    missing["steps"][0]["timeline"][0].as_object_mut().unwrap().remove("start_offset_ms");
    assert!(!validator.is_valid(&missing));
    // And it round-trips: what was printed reads back to the same value.
    let again: serde_json::Value = serde_json::from_str(&serde_json::to_string(&detail).unwrap()).unwrap();
    assert_eq!(again, detail);

    let flaky = &detail["steps"][0];
    assert_eq!(flaky["id"], "flaky");
    let timeline = flaky["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 2);
    assert_eq!(timeline[0]["status"], "retrying");
    assert_eq!(timeline[0]["error"]["code"], "http_503");
    assert_eq!(timeline[1]["status"], "succeeded");
    assert!(timeline[1]["start_offset_ms"].as_i64().unwrap() >= timeline[0]["start_offset_ms"].as_i64().unwrap());
    let triage = detail["steps"].as_array().unwrap().iter().find(|s| s["id"] == "triage").unwrap();
    assert_eq!(triage["decision"]["choice"], "bug");
    assert_eq!(triage["llm"]["input_tokens"], 40);
    let children = detail["children"].as_array().unwrap();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c["step"] == "fan" && c["steps"][0]["id"] == "double"));
    assert_eq!(detail["trace_id"], id.replace('-', ""));
    model.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn retries_are_sibling_attempts_and_a_resumed_run_is_a_linked_run_span_in_the_same_trace() {
    switchyard_tests::install_crypto_provider();
    let receiver = OtlpReceiver::start().await;
    let counter = CounterServer::start().await;
    let vars = BTreeMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10".to_owned()),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
    ]);
    let telemetry = Telemetry::from_vars(|k| vars.get(k).cloned(), false).unwrap();
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-resume", Arc::new(SystemClock), Limits::default(), options).await;
    // `flaky` fails once then succeeds (two attempts); `gate` fails for
    // good the first time (status 500, no retries), and passes after resume.
    let def = setup.compile(&format!(
        "name: resumed\nsteps:\n  - id: flaky\n    kind: http\n    retry: {{max_attempts: 3, initial_delay: 1ms}}\n    with: {{url: \"{}\"}}\n  - id: gate\n    kind: http\n    needs: [flaky]\n    with: {{url: \"{}\"}}\n",
        counter.url("/hit/flaky?fail_first=1"),
        counter.url("/hit/gate?fail_first=1"),
    ));
    let first = setup.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(first.status, RunStatus::Failed);
    setup.engine.resume(&first.id).await.unwrap();
    let second = setup.engine.wait(&first.id).await.unwrap();
    assert_eq!(second.status, RunStatus::Succeeded);
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(10))).await.unwrap();
    let spans = receiver.spans();
    let trace = first.id.replace('-', "");
    assert!(spans.iter().all(|s| s.trace_id == trace));
    assert_tree(&spans, "");
    // Two run spans: the failed one, and the resumed one linked to it.
    let runs = named(&spans, "invoke_workflow resumed");
    assert_eq!(runs.len(), 2, "{runs:?}");
    let failed = runs.iter().find(|r| r.attr("switchyard.run.status") == Some("failed")).unwrap();
    let resumed = runs.iter().find(|r| r.attr("switchyard.run.status") == Some("succeeded")).unwrap();
    assert_eq!(resumed.links, vec![(trace.clone(), failed.span_id.clone())]);
    assert_eq!(failed.status, 2);
    // `flaky` ran in the first segment only: one step span, two sibling attempts.
    let flaky = one(&spans, "step flaky");
    assert_eq!(flaky.parent_id, failed.span_id);
    let attempts: Vec<_> = spans.iter().filter(|s| s.parent_id == flaky.span_id).collect();
    assert_eq!(attempts.len(), 2);
    let statuses: BTreeSet<_> = attempts.iter().filter_map(|a| a.attr("switchyard.step.status")).collect();
    assert_eq!(statuses, BTreeSet::from(["retrying", "succeeded"]));
    assert!(attempts.iter().any(|a| a.attr("http.response.status_code") == Some("503")));
    // `gate` failed in the first segment and succeeded in the second: one
    // attempt in each run span.
    let gates: Vec<_> = spans.iter().filter(|s| s.attr("switchyard.step.id") == Some("gate")).collect();
    assert_eq!(gates.len(), 2);
    assert!(gates.iter().any(|g| g.parent_id == failed.span_id && g.status == 2));
    assert!(gates.iter().any(|g| g.parent_id == resumed.span_id
        && g.attr("switchyard.step.status") == Some("succeeded")
        && g.attr("switchyard.step.attempt") == Some("2")));
    setup.stop().await;
    receiver.stop().await;
    counter.stop().await;
}

/// Telemetry exporting to `receiver`, flushed by [`flushed`].
fn exporting(receiver: &OtlpReceiver, capture: bool) -> Telemetry {
    let mut vars = BTreeMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "10".to_owned()),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
    ]);
    if capture {
        vars.insert("SWITCHYARD_OTEL_CAPTURE_CONTENT", "true".to_owned());
    }
    Telemetry::from_vars(|k| vars.get(k).cloned(), false).unwrap()
}

async fn flushed(telemetry: &Telemetry) {
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(10))).await.unwrap();
}

#[tokio::test]
async fn an_agent_is_an_invoke_agent_span_with_execute_tool_spans_and_tools_carry_the_trace() {
    switchyard_tests::install_crypto_provider();
    let receiver = OtlpReceiver::start().await;
    let counter = CounterServer::start().await;
    let telemetry = exporting(&receiver, false);
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-agent", Arc::new(SystemClock), Limits::default(), options).await;
    setup.server.script_all([
        Reply::tool_calls(vec![("get_alerts", json!({"service": "api"}))]).usage(50, 5),
        Reply::text("TOOL-ANSWER-CANARY the api is slow").usage(60, 8),
    ]);
    let def = setup.compile(&format!(
        r#"
name: oncall
steps:
  - id: helper
    kind: agent
    with:
      prompt: "Why is api slow?"
      tools:
        - name: get_alerts
          description: Open alerts of a service.
          parameters: {{type: object, properties: {{service: {{type: string}}}}, required: [service]}}
          http: {{url: "{}"}}
"#,
        counter.url("/hit/alerts")
    ));
    let outcome = setup.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    flushed(&telemetry).await;
    let spans = receiver.spans();
    let agent = one(&spans, "invoke_agent helper");
    assert_eq!(agent.attr("gen_ai.operation.name"), Some("invoke_agent"));
    assert_eq!(agent.attr("gen_ai.agent.name"), Some("helper"));
    let chats: Vec<_> = named(&spans, "chat test-model");
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|c| c.parent_id == agent.span_id));
    let tool = one(&spans, "execute_tool get_alerts");
    assert_eq!(tool.parent_id, agent.span_id);
    assert_eq!(tool.attr("gen_ai.operation.name"), Some("execute_tool"));
    assert_eq!(tool.attr("gen_ai.tool.name"), Some("get_alerts"));
    assert!(tool.attr("gen_ai.tool.call.id").is_some());
    assert_eq!(tool.attr("gen_ai.tool.call.result"), None, "no tool results without capture");
    let call = &counter.calls_to("alerts")[0];
    assert_eq!(call.headers.get("traceparent"), Some(&format!("00-{}-{}-01", agent.trace_id, agent.span_id)));
    assert!(!all_text(&spans).contains("TOOL-ANSWER-CANARY"));
    setup.stop().await;
    receiver.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn a_confidential_workflow_puts_no_content_on_spans_even_with_capture_on() {
    switchyard_tests::install_crypto_provider();
    let receiver = OtlpReceiver::start().await;
    let telemetry = exporting(&receiver, true);
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-confidential", Arc::new(SystemClock), Limits::default(), options).await;
    setup.server.always(Reply::text("SECRET-ANSWER"));
    let secret = setup.compile(
        "name: secret\nconfidential: true\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: \"SECRET-PROMPT\"}\n  - id: fan\n    kind: map\n    needs: [ask]\n    with:\n      items: [\"SECRET-ITEM\"]\n      steps:\n        - id: echo\n          kind: transform\n          with: {value: \"{{ input.item }}\"}\n",
    );
    let outcome = setup.engine.run(&secret, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded);
    let open = setup.compile_as(
        "open.yaml",
        "name: open\nsteps:\n  - id: ask\n    kind: llm\n    with: {prompt: \"OPEN-PROMPT\"}\n",
    );
    assert_eq!(setup.engine.run(&open, json!({})).await.unwrap().status, RunStatus::Succeeded);
    flushed(&telemetry).await;
    let spans = receiver.spans();
    let (secret_spans, open_spans): (Vec<ReceivedSpan>, Vec<ReceivedSpan>) =
        spans.iter().cloned().partition(|s| s.trace_id == outcome.id.replace('-', ""));
    assert!(secret_spans.len() >= 6, "the confidential run is traced: {secret_spans:?}");
    let text = all_text(&secret_spans);
    for canary in ["SECRET-ANSWER", "SECRET-PROMPT", "SECRET-ITEM"] {
        assert!(!text.contains(canary), "{canary} on a confidential run's span:\n{text}");
    }
    // The other workflow, with capture on, does get its content.
    assert!(all_text(&open_spans).contains("OPEN-PROMPT"));
    setup.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn json_logs_carry_the_trace_and_span_ids_of_the_run() {
    let dir = temp_dir("otel-logs");
    let (receiver, model, counter) =
        (OtlpReceiver::start().await, ModelServer::start().await, CounterServer::start().await);
    let file = dir.join("l.yaml");
    std::fs::write(
        &file,
        format!(
            "name: logged\nsteps:\n  - id: call\n    kind: http\n    retry: {{max_attempts: 2, initial_delay: 1ms}}\n    with: {{url: \"{}\"}}\n",
            counter.url("/hit/call?fail_first=1")
        ),
    )
    .unwrap();
    let out = output_within(
        switchyard(&dir.join("db"), &receiver.endpoint(), &model)
            .env("SWITCHYARD_LOG_FORMAT", "json")
            .env("SWITCHYARD_LOG", "debug")
            .arg("run")
            .arg(&file),
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr.lines().find_map(|l| l.strip_prefix("run ")).and_then(|l| l.split_whitespace().next()).unwrap();
    let lines: Vec<serde_json::Value> =
        stderr.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let of_run: Vec<&serde_json::Value> = lines.iter().filter(|l| l["span"]["name"].is_string()).collect();
    assert!(of_run.len() >= 2, "attempt lines: {lines:#?}");
    let trace = id.replace('-', "");
    let run_span = one(&receiver.spans(), "invoke_workflow logged").span_id.clone();
    for line in of_run {
        assert_eq!(line["span"]["trace_id"], trace.as_str(), "{line}");
        assert_eq!(line["span"]["span_id"], run_span.as_str(), "the run span's id: {line}");
        assert!(line["spans"][0]["run_id"] == id, "{line}");
    }
    receiver.stop().await;
    model.stop().await;
    counter.stop().await;
}

#[tokio::test]
async fn error_messages_that_quote_content_stay_off_spans_without_capture() {
    switchyard_tests::install_crypto_provider();
    let receiver = OtlpReceiver::start().await;
    let telemetry = exporting(&receiver, false);
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-errors", Arc::new(SystemClock), Limits::default(), options).await;
    // Never valid JSON: the step fails with `invalid_output`, whose message
    // quotes the answer.
    setup.server.always(Reply::text("ANSWER-CANARY is not json"));
    let def = setup.compile(
        "name: strict\nsteps:\n  - id: ask\n    kind: llm\n    with:\n      prompt: x\n      max_repairs: 0\n      output_schema: {type: object}\n",
    );
    let outcome = setup.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert!(outcome.error.as_ref().unwrap().message.contains("ANSWER-CANARY"), "the run's own error quotes it");
    flushed(&telemetry).await;
    let spans = receiver.spans();
    let ask = one(&spans, "llm ask");
    assert_eq!(ask.status, 2);
    assert_eq!(ask.status_message, "invalid_output");
    assert_eq!(ask.attr("switchyard.step.error.code"), Some("invalid_output"));
    let run = one(&spans, "invoke_workflow strict");
    assert_eq!(run.status_message, "invalid_output");
    let text = all_text(&spans);
    assert!(!text.contains("ANSWER-CANARY"), "an error message leaked content:\n{text}");
    setup.stop().await;
    receiver.stop().await;
}

#[tokio::test]
async fn a_run_cancelled_while_a_retry_waits_ends_its_step_span_and_a_rerun_reports_reused_steps() {
    switchyard_tests::install_crypto_provider();
    let receiver = OtlpReceiver::start().await;
    let counter = CounterServer::start().await;
    let telemetry = exporting(&receiver, false);
    let options = EngineOptions { telemetry: telemetry.clone(), ..Default::default() };
    let setup = ModelSetup::with_options("otel-cancel", Arc::new(SystemClock), Limits::default(), options).await;
    // `slow` fails and waits a minute to retry; the run is cancelled then.
    let yaml = |url: String| {
        format!(
            "name: backoff\nsteps:\n  - id: first\n    kind: transform\n    with: {{value: 1}}\n  - id: slow\n    kind: http\n    needs: [first]\n    retry: {{max_attempts: 3, initial_delay: 1m}}\n    with: {{url: \"{url}\"}}\n"
        )
    };
    let def = setup.compile(&yaml(counter.url("/hit/slow?status=503")));
    let id = setup.engine.submit(&def, json!({})).await.unwrap();
    counter.wait_for_calls("slow", 1).await;
    let settled = setup.engine.wait_settled(&id).await.unwrap();
    assert_eq!(settled.status, RunStatus::Waiting, "parked for the retry");
    setup.engine.cancel(&id).await.unwrap();
    assert_eq!(setup.engine.wait(&id).await.unwrap().status, RunStatus::Cancelled);
    // A re-run from `slow` (now answering) reuses `first`.
    let fixed = setup.compile_as("fixed.yaml", &yaml(counter.url("/hit/slow2")));
    let again = setup.engine.rerun(&id, "slow", Some(&fixed)).await.unwrap();
    assert_eq!(setup.engine.wait(&again).await.unwrap().status, RunStatus::Succeeded);
    flushed(&telemetry).await;
    let spans = receiver.spans();
    let (first_run, second_run): (Vec<ReceivedSpan>, Vec<ReceivedSpan>) =
        spans.iter().cloned().partition(|s| s.trace_id == id.replace('-', ""));
    assert_tree(&first_run, "");
    assert_tree(&second_run, "");
    // The cancelled run: the step that waited for its retry has its span,
    // grouping the failed attempt, ended with the run.
    let step = one(&first_run, "step slow");
    assert_eq!(step.attr("switchyard.step.status"), Some("cancelled"));
    let attempts: Vec<_> = first_run.iter().filter(|s| s.parent_id == step.span_id).collect();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].attr("switchyard.step.status"), Some("retrying"));
    assert_eq!(one(&first_run, "invoke_workflow backoff").attr("switchyard.run.status"), Some("cancelled"));
    // The re-run: `first` reused, reported once as such; `slow` ran.
    let reused = one(&second_run, "step first");
    assert_eq!(reused.attr("switchyard.step.status"), Some("reused"));
    assert_eq!(reused.attr("switchyard.step.reused_from"), Some(id.as_str()));
    assert!(named(&second_run, "transform first").is_empty(), "a reused step did not run");
    assert_eq!(one(&second_run, "GET").attr("switchyard.step.status"), Some("succeeded"));
    setup.stop().await;
    receiver.stop().await;
    counter.stop().await;
}

/// With the `grpc` feature (`.ci/run` runs this test with it), the binary
/// exports spans and metrics over OTLP/gRPC.
#[cfg(feature = "grpc")]
#[tokio::test]
async fn spans_and_metrics_reach_a_grpc_receiver() {
    switchyard_tests::install_crypto_provider();
    let dir = temp_dir("otel-grpc");
    let (receiver, model) = (OtlpReceiver::start_grpc().await, ModelServer::start().await);
    let file = dir.join("grpc.yaml");
    std::fs::write(
        &file,
        "name: grpc\nsteps:\n  - id: a\n    kind: transform\n    with: {value: 1}\n  - id: b\n    kind: transform\n    needs: [a]\n    with: {value: 2}\n",
    )
    .unwrap();
    let out = output_within(
        switchyard(&dir.join("db"), &receiver.endpoint(), &model)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env_remove("OTEL_METRICS_EXPORTER")
            .arg("run")
            .arg(&file)
            .arg("--traceparent")
            .arg(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")),
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The process flushed both signals before it exited.
    let received = receiver.received();
    let spans = &received.spans;
    assert_tree(spans, CALLER_SPAN);
    assert!(spans.iter().all(|s| s.trace_id == CALLER_TRACE), "one trace: {spans:?}");
    let run = one(spans, "invoke_workflow grpc");
    assert_eq!(run.parent_id, CALLER_SPAN);
    for step in ["a", "b"] {
        let attempt = one(spans, &format!("transform {step}"));
        assert_eq!(attempt.parent_id, run.span_id, "{step} under the run");
    }
    assert!(received.metrics.iter().any(|m| m == "switchyard.runs.started"), "{:?}", received.metrics);
    receiver.stop().await;
    model.stop().await;
}
