use super::*;
use crate::workflow::Bundle;

fn registry() -> Registry {
    crate::offline_registry()
}

fn compile_files(files: &[(&str, &str)]) -> Result<Definition, CompileErrors> {
    let bundle = Bundle {
        root: files[0].0.to_owned(),
        files: files.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    compile_bundle(&bundle, &registry())
}

fn errors(yaml: &str) -> Vec<String> {
    compile_files(&[("wf.yaml", yaml)]).unwrap_err().0.iter().map(|e| format!("{}: {}", e.place, e.message)).collect()
}

#[test]
fn compiles_a_branching_workflow() {
    let def = compile_files(&[(
        "wf.yaml",
        r#"
name: triage
input: {type: object, required: [severity]}
steps:
  - id: route
    kind: switch
    with:
      cases:
        - when: "input.severity == 'high'"
          path: page
      default: ticket
  - id: page
    kind: transform
    needs: [route.page]
    with: {who: oncall}
  - id: ticket
    kind: transform
    needs: [route.ticket]
    with: {who: "{{ input.severity }}"}
  - id: done
    kind: transform
    needs: [page, ticket]
    join: any
    with: {ok: true}
output: "{{ steps.done.output }}"
"#,
    )])
    .unwrap();
    let wf = &def.workflow;
    assert_eq!(wf.name(), "triage");
    assert_eq!(wf.steps[3].needs.len(), 2);
    assert_eq!(wf.steps[0].dependents, vec![1, 2]);
    assert!(wf.check_input(&serde_json::json!({})).unwrap_err()[0].contains("severity"));
    assert_eq!(def.hash.len(), 64);
}

#[test]
fn reports_every_error_with_its_place() {
    let errs = errors(
        r#"
name: broken
steps:
  - id: a
    kind: transform
    with: {x: "{{ input. }}"}
  - id: a
    kind: htp
  - id: c
    kind: http
    needs: [clasify]
    with: {url: "http://x", method: FETCH}
  - id: d
    kind: transform
    when: "steps.c.output.ok"
    with: {x: 1}
  - id: e
    kind: transform
    needs: [f]
    with: {}
  - id: f
    kind: transform
    needs: [e]
    with: {}
"#,
    );
    let joined = errors_text(&errs);
    for expected in [
        "steps[0].with.x: syntax error",
        "steps[1].id: duplicate id \"a\" (first at steps[0])",
        "steps[1].kind: unknown kind \"htp\"",
        "steps[2].needs[0]: unknown step \"clasify\"",
        "steps[2].with.method: unknown method \"FETCH\"",
        "steps[3].when: `steps.c.output.ok` reads step \"c\", which is not upstream of \"d\"",
        "steps[4].needs: cycle between steps e -> f",
    ] {
        assert!(joined.contains(expected), "missing {expected:?} in:\n{joined}");
    }
}

fn errors_text(errs: &[String]) -> String {
    errs.join("\n")
}

#[test]
fn rejects_bad_configs_and_retry_policies() {
    let joined = errors_text(&errors(
        r#"
name: cfg
steps:
  - id: s
    kind: sleep
    with: {}
  - id: t
    kind: fail
    with: {message: x, extra: 1}
    retry: {max_attempts: 0, initial_delay: soon, jitter: 2}
    timeout: forever
  - id: r
    kind: switch
    with: {cases: []}
  - id: n
    kind: transform
    needs: [r.nowhere]
    with: {}
"#,
    ));
    for expected in [
        "steps[0].with: set exactly one of `duration` or `until`",
        "steps[1].with.extra: unknown field `extra`",
        "steps[1].retry.max_attempts: must be at least 1",
        "steps[1].retry.jitter",
        "steps[1].retry.initial_delay: invalid duration",
        "steps[1].timeout: invalid duration",
        "steps[2].with.cases: needs at least one case",
    ] {
        assert!(joined.contains(expected), "missing {expected:?} in:\n{joined}");
    }
}

#[test]
fn yaml_errors_name_the_line() {
    let errs = compile_files(&[("wf.yaml", "name: x\nsteps:\n  - id: a\n    kind: [\n")]).unwrap_err();
    assert!(errs.to_string().starts_with("wf.yaml: "), "{errs}");
    assert!(errs.to_string().contains("line"), "{errs}");
}

#[test]
fn child_workflows_are_bundled_and_cycles_found() {
    let def = compile_files(&[
        (
            "main.yaml",
            "name: main\nsteps:\n  - id: c\n    kind: workflow\n    with: {path: sub/child.yaml, input: {x: 1}}\n",
        ),
        ("sub/child.yaml", "name: child\nsteps:\n  - id: t\n    kind: transform\n    with: {y: \"{{ input.x }}\"}\n"),
    ])
    .unwrap();
    assert_eq!(def.bundle.files.len(), 2);

    let errs = compile_files(&[
        ("a.yaml", "name: a\nsteps:\n  - id: c\n    kind: workflow\n    with: {path: b.yaml}\n"),
        ("b.yaml", "name: b\nsteps:\n  - id: c\n    kind: workflow\n    with: {path: a.yaml}\n"),
    ])
    .unwrap_err();
    assert!(errs.to_string().contains("cycle: a.yaml -> b.yaml -> a.yaml"), "{errs}");
}

#[test]
fn map_inline_steps_may_read_item_and_index_only_in_input() {
    let ok = compile_files(&[(
        "m.yaml",
        r#"
name: m
steps:
  - id: each
    kind: map
    with:
      items: "{{ input.hosts }}"
      input: {host: "{{ item }}", i: "{{ index }}"}
      steps:
        - id: t
          kind: transform
          with: {h: "{{ input.host }}"}
      output: "{{ steps.t.output.h }}"
"#,
    )]);
    assert!(ok.is_ok(), "{:?}", ok.err());
    let joined = errors_text(&errors(
        "name: m\nsteps:\n  - id: e\n    kind: map\n    with: {items: \"{{ item }}\", steps: [{id: t, kind: transform, with: {}}]}\n",
    ));
    assert!(joined.contains("steps[0].with.items: unknown variable \"item\""), "{joined}");
}

#[test]
fn join_keys_are_relative_to_the_calling_file_and_stay_inside_its_folder() {
    assert_eq!(join_key("a/b.yaml", "c.yaml").unwrap(), "a/c.yaml");
    assert_eq!(join_key("a/b.yaml", "../c.yaml").unwrap(), "c.yaml");
    assert_eq!(join_key("b.yaml", "./x/c.yaml").unwrap(), "x/c.yaml");
    assert!(join_key("b.yaml", "../c.yaml").unwrap_err().contains("leaves the workflow's folder"));
    assert!(join_key("a/b.yaml", "../../c.yaml").unwrap_err().contains("leaves"));
    assert!(join_key("a/b.yaml", "x/../../../c.yaml").unwrap_err().contains("leaves"));
    assert!(join_key("b.yaml", "/etc/passwd").unwrap_err().contains("absolute"));
    assert!(join_key("b.yaml", "").is_err());
}

#[test]
fn called_files_outside_the_bundle_are_refused_without_quoting_them() {
    let errs = compile_files(&[(
        "wf.yaml",
        "name: w\nsteps:\n  - {id: a, kind: workflow, with: {path: ../../outside/app.env}}\n  - {id: b, kind: workflow, with: {path: /etc/passwd}}\n",
    )])
    .unwrap_err()
    .to_string();
    assert!(errs.contains("steps[0].with.path") && errs.contains("leaves the workflow's folder"), "{errs}");
    assert!(errs.contains("steps[1].with.path") && errs.contains("absolute"), "{errs}");
    // A file in the bundle that is not a workflow: its contents are not shown.
    let errs = compile_files(&[
        ("wf.yaml", "name: w\nsteps:\n  - {id: a, kind: workflow, with: {path: app.env}}\n"),
        ("app.env", "API_KEY=hunter2-secret\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(errs.contains("app.env"), "{errs}");
    assert!(!errs.contains("hunter2"), "{errs}");
}

#[test]
fn yaml_files_reject_duplicate_keys_and_deep_nesting_quickly() {
    let joined = errors_text(&errors("name: w\nname: v\nsteps:\n  - {id: a, kind: transform, with: {x: 1, x: 2}}\n"));
    assert!(joined.to_lowercase().contains("duplicate"), "{joined}");
    assert!(!joined.contains("Options"), "{joined}");
    let started = std::time::Instant::now();
    let deep = format!("name: w\nsteps: {}", "[".repeat(80_000));
    let joined = errors_text(&errors(&deep));
    assert!(!joined.is_empty());
    assert!(!joined.contains("[[[["), "the error must not quote the input: {joined}");
    // Generous for a debug build on a slow machine; it took 7.7 s before.
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
}

#[test]
fn a_long_chain_compiles_in_near_linear_time_and_memory() {
    let mut yaml = String::from("name: chain\nsteps:\n  - {id: s0, kind: transform, with: {v: 0}}\n");
    for i in 1..10_000 {
        yaml.push_str(&format!(
            "  - {{id: s{i}, kind: transform, needs: [s{}], with: {{v: \"{{{{ steps.s{}.output.v }}}}\"}}}}\n",
            i - 1,
            i - 1
        ));
    }
    let started = std::time::Instant::now();
    let def = compile_files(&[("wf.yaml", &yaml)]).unwrap();
    assert_eq!(def.workflow.step_ids().count(), 10_000);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
}

#[test]
fn a_custom_kind_that_chooses_paths_routes_like_a_switch() {
    // `fail` chooses no path: naming one is an error that says so.
    let joined = errors_text(&errors(
        "name: w\nsteps:\n  - {id: f, kind: fail, with: {message: x}}\n  - {id: g, kind: transform, needs: [f.x]}\n",
    ));
    assert!(joined.contains("does not choose a path"), "{joined}");
}

#[test]
fn json_files_use_the_same_model() {
    let def = compile_files(&[(
        "wf.json",
        r#"{"name": "j", "steps": [{"id": "a", "kind": "transform", "with": {"x": "{{ input.x }}"}},
            {"id": "b", "kind": "transform", "needs": ["a"], "with": {"y": 1}}], "output": "{{ steps.a.output }}"}"#,
    )])
    .unwrap();
    assert_eq!(def.workflow.step_ids().collect::<Vec<_>>(), ["a", "b"]);
    let errs =
        compile_files(&[("wf.json", r#"{"name": "j", "steps": [{"id": "a", "kind": "transform", "nope": 1}]}"#)])
            .unwrap_err();
    assert!(errs.to_string().contains("unknown field `nope`"), "{errs}");
}

#[test]
fn a_step_fingerprint_changes_with_its_own_definition_only() {
    let fingerprints = |files: &[(&str, &str)]| {
        let def = compile_files(files).unwrap_or_else(|e| panic!("{e}"));
        let wf = &def.workflow;
        ["a", "b", "call"].map(|id| wf.step_fingerprint(id).unwrap_or_default().to_owned())
    };
    let wf = |a_with: &str, b_with: &str| {
        format!(
            "name: f\nsteps:\n  - {{id: a, kind: transform, with: {a_with}}}\n  \
             - {{id: b, kind: transform, needs: [a], with: {b_with}}}\n  \
             - {{id: call, kind: workflow, needs: [b], with: {{path: child.yaml}}}}\n"
        )
    };
    let child = "name: child\nsteps:\n  - {id: x, kind: transform, with: {v: 1}}\n";
    let base = fingerprints(&[("wf.yaml", &wf("{v: 1, w: 2}", "{v: 2}")), ("child.yaml", child)]);
    assert!(base.iter().all(|f| f.len() == 64), "{base:?}");
    assert!(base[0] != base[1] && base[1] != base[2]);

    // Same definition, keys in another order: same fingerprints.
    assert_eq!(fingerprints(&[("wf.yaml", &wf("{w: 2, v: 1}", "{v: 2}")), ("child.yaml", child)]), base);

    // `with` of a changed: a changes, b and call do not.
    let edited = fingerprints(&[("wf.yaml", &wf("{v: 9, w: 2}", "{v: 2}")), ("child.yaml", child)]);
    assert_ne!(edited[0], base[0]);
    assert_eq!(edited[1..], base[1..]);

    // `with` of b changed: only b.
    let edited = fingerprints(&[("wf.yaml", &wf("{v: 1, w: 2}", "{v: 3}")), ("child.yaml", child)]);
    assert_eq!((edited[0] == base[0], edited[1] == base[1], edited[2] == base[2]), (true, false, true));

    // The called file changed: the caller's fingerprint changes.
    let child = "name: child\nsteps:\n  - {id: x, kind: transform, with: {v: 2}}\n";
    let edited = fingerprints(&[("wf.yaml", &wf("{v: 1, w: 2}", "{v: 2}")), ("child.yaml", child)]);
    assert_eq!(edited[..2], base[..2]);
    assert_ne!(edited[2], base[2]);

    // Other fields count too: a retry policy, a timeout.
    let retried = wf("{v: 1, w: 2}", "{v: 2}").replace("needs: [a], ", "needs: [a], timeout: 5s, ");
    let edited = fingerprints(&[("wf.yaml", &retried), ("child.yaml", child)]);
    assert_ne!(edited[1], base[1]);
}
