//! Property tests over generated workflows and inputs: compiling never
//! panics and either accepts or reports errors that name their file and
//! place; a workflow that compiles runs to an end without a panic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use switchyard_orchestrator::compile::compile_bundle;
use switchyard_orchestrator::workflow::Bundle;
use switchyard_orchestrator::{Engine, EngineOptions};
use switchyard_steps::SystemClock;
use switchyard_tests::temp_dir;

use crate::support::{registry, store};

const IDS: [&str; 6] = ["a", "b", "c", "d", "route", "1bad"];

/// Template snippets: good, undefined, hostile, broken.
const SNIPPETS: [&str; 18] = [
    "{{ input.x }}",
    "{{ input.x }}",
    "{{ input.x }}",
    "{{ input.x + 1 }}",
    "{{ steps.s0.output }}",
    "{{ steps.s1.output.v }}",
    "{{ steps }}",
    "{{ steps | list }}",
    "{{ [0] * 100000000 }}",
    "{{ 'x' * 100000000 }}",
    "{% for i in range(100000) %}{{ i }}{% endfor %}",
    "{{ input.items }}",
    "{{ item }}",
    "{% include 'x' %}",
    "{{ ",
    "{{ run.id }}",
    "{{ 1 / 0 }}",
    "plain text",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        prop::sample::select(SNIPPETS.as_slice()).prop_map(Value::from),
        "[a-z ]{0,12}".prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn with_for(kind: &str) -> BoxedStrategy<Value> {
    match kind {
        "switch" => (prop::sample::select(SNIPPETS.as_slice()), "[a-z]{1,3}")
            .prop_map(|(when, path)| json!({"cases": [{"when": when, "path": path}], "default": "other"}))
            .boxed(),
        "map" => (value(), any::<bool>())
            .prop_map(|(items, inline)| {
                if inline {
                    json!({"items": items, "concurrency": 2, "steps": [{"id": "m", "kind": "transform", "with": {"v": "{{ input.item }}"}}]})
                } else {
                    json!({"items": items, "workflow": "child.yaml"})
                }
            })
            .boxed(),
        "fail" => "[a-z ]{0,10}".prop_map(|m| json!({"message": m})).boxed(),
        "sleep" => Just(json!({"duration": "1ms"})).boxed(),
        "workflow" => prop_oneof![Just("child.yaml"), Just("../x.yaml"), Just("/etc/passwd"), Just("missing.yaml")]
            .prop_map(|p| json!({"path": p, "input": {"x": 1}}))
            .boxed(),
        _ => value().boxed(),
    }
}

/// Step `i` of a generated workflow: mostly well formed (ids `s0`.., needs
/// on earlier steps), sometimes not (a bad id, an unknown need, a cycle).
fn step(i: usize) -> impl Strategy<Value = Value> {
    const KINDS: [&str; 9] =
        ["transform", "transform", "transform", "fail", "switch", "sleep", "map", "workflow", "nonsense"];
    (
        prop::sample::select(KINDS.as_slice()),
        prop::collection::vec(any::<bool>(), i),
        prop::option::of(prop::sample::select(SNIPPETS.as_slice())),
        any::<bool>(),
        0..20u8,
    )
        .prop_flat_map(move |(kind, needed, when, continue_on_error, odd)| {
            with_for(kind).prop_map(move |with| {
                let mut needs: Vec<String> =
                    needed.iter().enumerate().filter(|(_, n)| **n).map(|(j, _)| format!("s{j}")).collect();
                let id = match odd {
                    0 => IDS[i % IDS.len()].to_owned(),
                    1 => "s0".to_owned(),
                    _ => format!("s{i}"),
                };
                match odd {
                    2 => needs.push("zz".into()),
                    3 => needs.push(format!("s{}", i + 1)),
                    4 if i > 0 => needs.push("s0.other".into()),
                    _ => {}
                }
                let mut step = json!({"id": id, "kind": kind, "with": with, "needs": needs});
                if let Some(when) = when.filter(|_| odd % 3 == 0) {
                    step["when"] = json!(when);
                }
                if continue_on_error {
                    step["on_error"] = json!("continue");
                }
                step
            })
        })
}

fn workflow() -> impl Strategy<Value = Value> {
    (1..6usize).prop_flat_map(|n| ((0..n).map(step).collect::<Vec<_>>(), prop::option::of(leaf()))).prop_map(
        |(steps, output)| {
            let mut wf = json!({"name": "gen", "steps": steps});
            if let Some(output) = output {
                wf["output"] = output;
            }
            wf
        },
    )
}

fn bundle(root: &Value) -> Bundle {
    let child = "name: child\nsteps:\n  - {id: t, kind: transform, with: {x: \"{{ input.x }}\"}}\n";
    Bundle {
        root: "gen.json".into(),
        files: BTreeMap::from([("gen.json".to_owned(), root.to_string()), ("child.yaml".to_owned(), child.to_owned())]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_workflows_compile_or_report_and_run_without_panics() {
    let dir = temp_dir("props");
    let store = store(&dir).await;
    let engine = Engine::start(store, registry(), Arc::new(SystemClock), EngineOptions::default());
    let registry = registry();
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(Config { cases: 128, failure_persistence: None, ..Config::default() });
    let (compiled, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let strategy = (workflow(), value());
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |(wf, input)| {
            let bundle = bundle(&wf);
            match compile_bundle(&bundle, &registry) {
                Err(errors) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    prop_assert!(!errors.0.is_empty());
                    for e in &errors.0 {
                        prop_assert!(!e.file.is_empty() && !e.message.is_empty(), "{e:?}");
                    }
                }
                Ok(def) => {
                    compiled.fetch_add(1, Ordering::Relaxed);
                    let input = json!({"x": input, "items": [1, 2]});
                    let outcome = handle.block_on(async {
                        tokio::time::timeout(Duration::from_secs(20), engine.run(&def, input)).await
                    });
                    let outcome = outcome.map_err(|_| TestCaseError::fail(format!("run did not end: {wf}")))?;
                    // Invalid input is an error; anything else must end.
                    if let Ok(outcome) = outcome {
                        prop_assert!(outcome.status.is_finished(), "{outcome:?}");
                    }
                }
            }
            Ok(())
        })
    });
    engine.shutdown().await;
    result.unwrap();
    let (compiled, refused) = (compiled.into_inner(), refused.into_inner());
    eprintln!("generated workflows: {compiled} compiled and ran, {refused} refused");
    assert!(compiled > 0 && refused > 0, "generation must exercise both sides: {compiled} compiled, {refused} refused");
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    /// Arbitrary text, YAML or JSON, never panics the compiler.
    #[test]
    fn arbitrary_text_never_panics_the_compiler(text in "(?s).{0,400}", json in any::<bool>()) {
        let root = if json { "wf.json" } else { "wf.yaml" };
        let bundle = Bundle { root: root.into(), files: BTreeMap::from([(root.to_owned(), text)]) };
        if let Err(errors) = compile_bundle(&bundle, &registry()) {
            prop_assert!(errors.0.iter().all(|e| !e.message.is_empty()));
        }
    }
}
