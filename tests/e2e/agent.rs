//! The `agent` kind against a local model server and a local HTTP server:
//! tool calls and their results, invalid arguments, parallel calls,
//! workflow tools, and the bounds.

use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_integrations::llm::Limits;
use switchyard_orchestrator::compile::compile_file;
use switchyard_orchestrator::journal::RunStatus;
use switchyard_steps::SystemClock;
use switchyard_tests::{CounterServer, Reply, temp_dir};

use crate::support::ModelSetup;

/// The shared model setup, and a local HTTP server for the tools.
struct Setup {
    m: ModelSetup,
    http: CounterServer,
}

impl std::ops::Deref for Setup {
    type Target = ModelSetup;
    fn deref(&self) -> &ModelSetup {
        &self.m
    }
}

impl Setup {
    async fn new(name: &str) -> Self {
        let m = ModelSetup::new(name, Arc::new(SystemClock), Limits::default()).await;
        Self { m, http: CounterServer::start().await }
    }

    async fn stop(self) {
        self.m.stop().await;
        self.http.stop().await;
    }
}

fn oncall(http: &CounterServer) -> String {
    format!(
        r#"
name: oncall
steps:
  - id: agent
    kind: agent
    with:
      system: You are the on-call assistant.
      prompt: "Why is {{{{ input.service }}}} slow?"
      max_turns: 4
      tools:
        - name: get_alerts
          description: Open alerts of a service.
          parameters:
            type: object
            properties: {{service: {{type: string}}}}
            required: [service]
          http: {{url: "{alerts}"}}
        - name: get_deploys
          description: Recent deploys of a service.
          parameters: {{type: object, properties: {{service: {{type: string}}}}}}
          http: {{url: "{deploys}", method: GET}}
output: "{{{{ steps.agent.output }}}}"
"#,
        alerts = http.url("/hit/alerts"),
        deploys = http.url("/hit/deploys"),
    )
}

fn tool_messages(request: &switchyard_tests::ModelRequest) -> Vec<Value> {
    request.messages().into_iter().filter(|m| m["role"] == "tool").collect()
}

#[tokio::test]
async fn tool_calls_run_and_their_results_go_back_to_the_model() {
    let s = Setup::new("agent-tools").await;
    s.server.script_all([
        Reply::tool_calls(vec![("get_alerts", json!({"service": "db"})), ("get_deploys", json!({"service": "db"}))]),
        Reply::text("The db has an open alert and was deployed an hour ago."),
    ]);
    let def = s.compile(&oncall(&s.http));
    let outcome = s.engine.run(&def, json!({"service": "db"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    let output = outcome.output.unwrap();
    assert_eq!(output["text"], "The db has an open alert and was deployed an hour ago.");
    assert_eq!((output["turns"].clone(), output["tool_calls"].clone()), (json!(2), json!(2)));

    // The tools were called: POST with the arguments, GET with them as the query.
    let alerts = s.http.calls_to("alerts");
    assert_eq!((alerts.len(), alerts[0].method.as_str()), (1, "POST"));
    assert_eq!(alerts[0].body, json!({"service": "db"}));
    assert_eq!(alerts[0].idempotency_key.as_deref(), Some(format!("{}/agent/tool/0", outcome.id).as_str()));
    let deploys = s.http.calls_to("deploys");
    assert_eq!((deploys[0].method.as_str(), deploys[0].query.get("service").map(String::as_str)), ("GET", Some("db")));
    assert_eq!(deploys[0].idempotency_key.as_deref(), Some(format!("{}/agent/tool/1", outcome.id).as_str()));

    // The second model request carries both results, answering their calls.
    let requests = s.server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body["tools"][0]["function"]["name"], "get_alerts");
    let results = tool_messages(&requests[1]);
    assert_eq!(results.len(), 2);
    let first_call = &requests[1].messages()[2]["tool_calls"][0]["id"];
    assert_eq!(&results[0]["tool_call_id"], first_call);
    let echoed: Value = serde_json::from_str(results[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["name"], "alerts");
    s.stop().await;
}

#[tokio::test]
async fn invalid_tool_arguments_go_back_to_the_model_as_an_error() {
    let s = Setup::new("agent-invalid").await;
    s.server.script_all([
        Reply::tool_calls(vec![("get_alerts", json!({"service": 5}))]),
        Reply::tool_call_raw("get_alerts", "{not json"),
        Reply::tool_calls(vec![("restart_everything", json!({}))]),
        Reply::text("I could not look."),
    ]);
    let def = s.compile(&oncall(&s.http));
    let outcome = s.engine.run(&def, json!({"service": "db"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(s.http.count("alerts"), 0, "no tool ran on invalid arguments");
    let requests = s.server.requests();
    let error = |i: usize| tool_messages(&requests[i]).last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(error(1).starts_with("error: invalid arguments") && error(1).contains("/service"), "{}", error(1));
    assert!(error(2).starts_with("error: the arguments are not valid JSON"), "{}", error(2));
    assert!(error(3).contains("unknown tool \"restart_everything\""), "{}", error(3));
    s.stop().await;
}

#[tokio::test]
async fn max_turns_stops_the_loop_with_a_clear_error() {
    let s = Setup::new("agent-turns").await;
    s.server.always(Reply::tool_calls(vec![("get_alerts", json!({"service": "db"}))]));
    let def = s.compile(&oncall(&s.http));
    let outcome = s.engine.run(&def, json!({"service": "db"})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "agent_max_turns");
    assert!(error.message.contains("max_turns (4)") && error.message.contains("4 tool calls"), "{}", error.message);
    assert_eq!(s.server.count(), 4);
    s.stop().await;
}

#[tokio::test]
async fn max_tokens_stops_the_loop() {
    let s = Setup::new("agent-tokens").await;
    s.server.always(Reply::tool_calls(vec![("get_alerts", json!({"service": "db"}))]).usage(100, 50));
    let yaml = oncall(&s.http).replace("      max_turns: 4\n", "      max_turns: 4\n      max_tokens: 200\n");
    let def = s.compile(&yaml);
    let outcome = s.engine.run(&def, json!({"service": "db"})).await.unwrap();
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "agent_max_tokens", "{}", error.message);
    assert_eq!(s.server.count(), 2, "the third call would start beyond the bound");
    s.stop().await;
}

#[tokio::test]
async fn the_calls_of_one_turn_run_concurrently() {
    let s = Setup::new("agent-parallel").await;
    // Both calls are held by the server until both have arrived.
    let yaml = oncall(&s.http)
        .replace("/hit/alerts", "/hit/slow?hold_first=2")
        .replace("/hit/deploys", "/hit/slow?hold_first=2");
    s.server.script_all([
        Reply::tool_calls(vec![("get_alerts", json!({"service": "a"})), ("get_deploys", json!({"service": "b"}))]),
        Reply::text("done"),
    ]);
    let def = s.compile(&yaml);
    let id = s.engine.submit(&def, json!({"service": "db"})).await.unwrap();
    s.http.wait_for_calls("slow", 2).await;
    assert_eq!(s.http.in_flight(), 2);
    s.http.release("slow");
    let outcome = s.engine.wait(&id).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    s.stop().await;
}

#[tokio::test]
async fn a_workflow_tool_is_a_child_run_with_its_input_schema() {
    let s = Setup::new("agent-workflow").await;
    s.write(
        "page.yaml",
        "name: page\ninput:\n  type: object\n  properties: {who: {type: string}}\n  required: [who]\nsteps:\n  - {id: paged, kind: transform, with: {value: \"paged {{ input.who }}\"}}\noutput: \"{{ steps.paged.output.value }}\"\n",
    );
    let yaml = r#"
name: pager
steps:
  - id: agent
    kind: agent
    with:
      prompt: Page someone.
      tools:
        - name: page
          description: Pages a person.
          workflow: page.yaml
output: "{{ steps.agent.output.text }}"
"#;
    s.server.script_all([Reply::tool_calls(vec![("page", json!({"who": "ana"}))]), Reply::text("Paged ana.")]);
    let def = s.compile(yaml);
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(outcome.output, Some(json!("Paged ana.")));
    let requests = s.server.requests();
    assert_eq!(requests[0].body["tools"][0]["function"]["parameters"]["required"], json!(["who"]));
    assert_eq!(tool_messages(&requests[1])[0]["content"], "paged ana");
    let child = s.store.run(&format!("{}/agent/tool/0", outcome.id)).await.unwrap().expect("the tool's child run");
    assert_eq!((child.workflow.as_str(), child.status), ("page", RunStatus::Succeeded));
    // A call the child's schema refuses is not run.
    s.server.script_all([Reply::tool_calls(vec![("page", json!({}))]), Reply::text("No.")]);
    let outcome = s.engine.run(&def, json!({})).await.unwrap();
    let error = tool_messages(&s.server.requests()[3])[0]["content"].as_str().unwrap().to_owned();
    assert!(error.contains("invalid arguments") && error.contains("who"), "{error}");
    assert!(s.store.run(&format!("{}/agent/tool/0", outcome.id)).await.unwrap().is_none());
    s.stop().await;
}

#[test]
fn compile_checks_the_tools() {
    let dir = temp_dir("agent-compile");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        r#"
name: bad
steps:
  - id: agent
    kind: agent
    with:
      prompt: x
      max_turns: 0
      tools:
        - {name: a, description: d, http: {url: "http://127.0.0.1:1/"}, workflow: w.yaml}
        - {name: a, description: d, parameters: {type: 12}, http: {url: "http://127.0.0.1:1/"}}
        - {name: c, description: d, workflow: missing.yaml}
"#,
    )
    .unwrap();
    let errors = compile_file(&path, &switchyard_orchestrator::offline_registry()).unwrap_err().to_string();
    for expected in [
        "steps[0].with.tools[0]: set one of `http` or `workflow`",
        "steps[0].with.tools[1].name: a second tool named \"a\"",
        "steps[0].with.tools[1].parameters: invalid JSON Schema",
        "steps[0].with.max_turns: between 1 and 100",
    ] {
        assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
    }
}
