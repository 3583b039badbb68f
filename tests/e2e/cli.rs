//! The `switchyard` binary as a process: validation errors and a real crash.

use std::process::Stdio;

use serde_json::json;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_tests::{CounterServer, temp_dir};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{journal, step_events, store};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");

fn switchyard(db: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db").arg(db).env("SWITCHYARD_SQLITE_SYNC", "normal").kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn validate_reports_every_error_with_its_place_and_exits_2() {
    let dir = temp_dir("validate");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
name: broken
steps:
  - id: fetch
    kind: http
    with: {url: "{{ input.url ", method: GET}
  - id: fetch
    kind: transform
    with: {}
  - id: classify
    kind: htp
  - id: route
    kind: transform
    needs: [clasify]
    with: {}
  - id: page
    kind: http
    with: {url: "http://x", timeout: soon}
  - id: a
    kind: transform
    needs: [b]
  - id: b
    kind: transform
    needs: [a]
"#,
    )
    .unwrap();
    let malformed = dir.join("malformed.yaml");
    std::fs::write(&malformed, "name: x\nsteps: [\n").unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, "name: good\nsteps:\n  - id: t\n    kind: transform\n    with: {}\n").unwrap();

    let out = switchyard(&dir.join("db")).arg("validate").arg(&good).arg(&bad).arg(&malformed).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("good.yaml: ok"), "{stdout}");
    let bad = bad.display().to_string();
    for expected in [
        format!("{bad}: steps[0].with.url: syntax error"),
        format!("{bad}: steps[1].id: duplicate id \"fetch\""),
        format!("{bad}: steps[2].kind: unknown kind \"htp\""),
        format!("{bad}: steps[3].needs[0]: unknown step \"clasify\""),
        format!("{bad}: steps[4].with.timeout: invalid duration"),
        format!("{bad}: steps[5].needs: cycle between steps a -> b"),
        format!("{}: ", malformed.display()),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");

    // `run` refuses the same file with the same errors, and bad input too.
    let out = switchyard(&dir.join("db")).arg("run").arg(&bad).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = switchyard(&dir.join("db")).arg("run").arg(&good).args(["--input", "{nope"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--input"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_resumes_without_repeating_completed_steps() {
    let server = CounterServer::start().await;
    let dir = temp_dir("crash");
    let db = dir.join("switchyard.db");
    // Five steps in a chain; step 3's first request is held so the process
    // can be killed while it is in flight.
    let mut yaml = String::from("name: crashy\nsteps:\n");
    for k in 1..=5 {
        let hold = if k == 3 { "&hold_first=1" } else { "" };
        let url = server.url(&format!("/hit/s{k}?n={{{{ input.n }}}}{hold}"));
        yaml.push_str(&format!("  - id: s{k}\n    kind: http\n"));
        if k > 1 {
            yaml.push_str(&format!("    needs: [s{}]\n", k - 1));
        }
        yaml.push_str(&format!("    with:\n      method: POST\n      url: \"{url}\"\n"));
        let prev = if k == 1 { "0".to_owned() } else { format!("steps.s{}.output.body.echo.total", k - 1) };
        yaml.push_str(&format!("      json: {{total: \"{{{{ {prev} + {k} }}}}\"}}\n"));
    }
    yaml.push_str("output: \"{{ steps.s5.output.body.echo.total }}\"\n");
    let file = dir.join("crashy.yaml");
    std::fs::write(&file, yaml).unwrap();

    let mut first = switchyard(&db)
        .env("SWITCHYARD_LEASE", "1s")
        .arg("run")
        .arg(&file)
        .args(["--input", r#"{"n": 7}"#])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(first.stderr.take().unwrap()).lines();
    let first_line = stderr.next_line().await.unwrap().unwrap();
    let run_id = first_line.split_whitespace().nth(1).unwrap().to_owned();
    server.wait_for_held("s3").await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    assert_eq!(server.count("s4"), 0);

    // A worker picks the run up once the dead process's lease expires.
    let out =
        switchyard(&db).env("SWITCHYARD_LEASE", "1s").args(["worker", "--exit-when-idle"]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let store = store(&dir).await;
    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(run.output, Some(json!(15)));
    assert_eq!((server.count("s1"), server.count("s2"), server.count("s4"), server.count("s5")), (1, 1, 1, 1));
    let s3 = server.calls_to("s3");
    assert_eq!(s3.len(), 2, "step 3 ran again once");
    assert_eq!(s3[0].idempotency_key, s3[1].idempotency_key);
    assert_eq!(s3[0].idempotency_key.as_deref(), Some(&format!("{run_id}/s3")[..]));
    let j = journal(&store, &run_id).await;
    let attempts: Vec<u32> = step_events(&j, "s3")
        .iter()
        .filter_map(|e| match e.event {
            Event::StepStarted { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2]);

    // The CLI shows the finished run.
    let out = switchyard(&db).args(["runs", "show", &run_id]).output().await.unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("status:   succeeded") && shown.contains("s3"), "{shown}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_cancel_from_another_process_stops_the_run() {
    let server = CounterServer::start().await;
    let dir = temp_dir("cancel-cli");
    let db = dir.join("switchyard.db");
    let file = dir.join("wait.yaml");
    std::fs::write(
        &file,
        format!(
            "name: wait\ninput: {{type: object, required: [who]}}\nsteps:\n  - id: call\n    kind: http\n    with: {{url: \"{}\", query: {{who: \"{{{{ input.who }}}}\"}}}}\n",
            server.url("/hit/call?hold_first=1")
        ),
    )
    .unwrap();
    let input = dir.join("input.json");
    std::fs::write(&input, r#"{"who": "ops"}"#).unwrap();
    let mut running = switchyard(&db)
        .arg("run")
        .arg(&file)
        .arg("--input")
        .arg(format!("@{}", input.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(running.stderr.take().unwrap()).lines();
    let run_id = stderr.next_line().await.unwrap().unwrap().split_whitespace().nth(1).unwrap().to_owned();
    server.wait_for_held("call").await;
    assert_eq!(server.calls_to("call")[0].query["who"], "ops");

    let out = switchyard(&db).args(["runs", "cancel", &run_id]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("requested"));
    // The process running it notices at its next poll and ends the run.
    let status = running.wait().await.unwrap();
    assert_eq!(status.code(), Some(1));
    let mut rest = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l.contains(&format!("run {run_id} cancelled"))), "{rest:?}");
    let store = store(&dir).await;
    assert_eq!(store.run(&run_id).await.unwrap().unwrap().status, RunStatus::Cancelled);

    let out = switchyard(&db).args(["runs", "cancel", "no-such-run"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = switchyard(&db).args(["runs", "list", "--status", "bogus"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    server.stop().await;
}

#[tokio::test]
async fn bench_prints_one_valid_json_line_per_measurement() {
    let dir = temp_dir("bench");
    let out = Command::new(BIN).arg("bench").env("TMPDIR", dir.path()).kill_on_drop(true).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let kinds: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["workload"].as_str().unwrap(), l["metric"].as_str().unwrap())).collect();
    assert_eq!(kinds, [("chain40", "latency"), ("chain40", "throughput"), ("fanout100", "latency")]);
    for line in &lines {
        assert!(line.get("error").is_none(), "{line}");
        assert_eq!(line["engine"], "switchyard");
        assert_eq!(line["mode"], "sqlite-wal-full");
        assert_eq!(line["per_step_durable"], "yes");
    }
    assert_eq!(
        (lines[0]["n"].as_u64(), lines[1]["n"].as_u64(), lines[2]["n"].as_u64()),
        (Some(30), Some(200), Some(20))
    );
    for l in [&lines[0], &lines[2]] {
        let (p50, p95) = (l["p50_ms"].as_f64().unwrap(), l["p95_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p95, "{l}");
    }
    let wall = lines[1]["wall_s"].as_f64().unwrap();
    let steps = lines[1]["steps_per_s"].as_f64().unwrap();
    assert!(wall > 0.0 && (steps - 8000.0 / wall).abs() / steps < 0.01, "{}", lines[1]);
    // The database lived in the temporary folder and is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let figures = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md")).unwrap();
    for needle in ["chain40", "fanout100", "switchyard bench", "sqlite-wal-full"] {
        assert!(figures.contains(needle), "BENCHMARKS.md lacks {needle}");
    }
}

#[tokio::test]
async fn run_with_an_idempotency_key_reports_the_first_run_again() {
    let dir = temp_dir("run-once");
    let db = dir.join("switchyard.db");
    let file = dir.join("once.yaml");
    std::fs::write(&file, "name: once\nsteps:\n  - id: t\n    kind: transform\n    with: {n: \"{{ input.n }}\"}\noutput: \"{{ steps.t.output.n }}\"\n")
        .unwrap();
    let run = |n: u32| {
        let mut cmd = switchyard(&db);
        cmd.arg("run").arg(&file).args(["--idempotency-key", "k1", "--input", &format!(r#"{{"n": {n}}}"#)]);
        cmd
    };
    let first = run(1).output().await.unwrap();
    let again = run(2).output().await.unwrap();
    assert!(first.status.success() && again.status.success());
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), "1");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "1", "the first run's result, not a new run");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let listed = switchyard(&db).args(["runs", "list"]).output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 2, "a header and one run");
}

/// The README's quick-start command, word for word (with its own database).
#[tokio::test]
async fn the_quick_start_runs_the_nightly_report_offline() {
    let dir = temp_dir("quickstart");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let command = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -p switchyard-orchestrator -- run "))
        .expect("the quick start in README.md");
    let args: Vec<&str> = command.split(" -- ").nth(1).unwrap().split_whitespace().collect();
    let out = switchyard(&dir.join("switchyard.db")).current_dir(root).args(&args).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["overall"], "red");
    assert_eq!(report["breaches"], json!(["search"]));
}

// Hardening: output that cannot panic or steer a terminal, machine output,
// and the database named in errors.

use std::process::Output;
use std::time::Duration;

/// Runs `cmd` to its end, or fails the test after 60 s: the child is killed
/// when the timed-out future drops it (`kill_on_drop`).
async fn output_within(cmd: &mut Command) -> Output {
    match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
        Ok(out) => out.expect("the binary starts"),
        Err(_) => panic!("{cmd:?} did not end within 60 s (killed)"),
    }
}

/// [`output_within`] for a command whose stdout or stderr the test sets
/// itself (`output()` would replace both with pipes); the others are piped.
async fn spawned_output_within(cmd: &mut Command) -> Output {
    let child = cmd.spawn().expect("the binary starts");
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => out.expect("the binary ends"),
        Err(_) => panic!("{cmd:?} did not end within 60 s (killed)"),
    }
}

/// A workflow file of one `transform` step whose output is `{n: input.n}`.
fn one_step(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("one.yaml");
    std::fs::write(&file, "name: one\nsteps:\n  - id: t\n    kind: transform\n    with: {n: \"{{ input.n }}\"}\n")
        .unwrap();
    file
}

/// Starts a run of `file` and returns its id (from the first stderr line).
async fn run_ok(db: &std::path::Path, file: &std::path::Path, input: &str) -> String {
    let out = output_within(switchyard(db).arg("run").arg(file).args(["--input", input])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stderr.lines().next().and_then(|l| l.split_whitespace().nth(1)).expect("run <id> started").to_owned()
}

#[tokio::test]
async fn runs_show_prints_a_wake_up_time_past_the_year_9999() {
    let dir = temp_dir("far-wake");
    let db = dir.join("switchyard.db");
    let file = dir.join("nap.yaml");
    std::fs::write(&file, "name: nap\nsteps:\n  - id: nap\n    kind: sleep\n    with: {duration: 8000y}\n").unwrap();
    let mut running =
        switchyard(&db).arg("run").arg(&file).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(running.stderr.take().unwrap()).lines();
    let id = stderr.next_line().await.unwrap().unwrap().split_whitespace().nth(1).unwrap().to_owned();
    // A timer this far away parks the run at once.
    let store = store(&dir).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while store.run(&id).await.unwrap().map(|r| r.status) != Some(RunStatus::Waiting) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the run parks");

    let out = output_within(switchyard(&db).args(["runs", "show", &id])).await;
    let (stdout, stderr_text) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr_text}");
    assert!(stdout.contains("wakes:    +1"), "{stdout}");
    assert!(stdout.contains("(until +1"), "the step's note: {stdout}");
    let out = output_within(switchyard(&db).args(["runs", "show", &id, "--json"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(shown["wake_at_ms"].as_i64().unwrap() > 253_402_300_799_999, "{shown}");
    assert!(shown["wake_at"].as_str().unwrap().starts_with('+'), "{shown}");
    running.start_kill().unwrap();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn a_closed_stdout_or_stderr_ends_the_command_without_a_panic() {
    let dir = temp_dir("broken-pipe");
    let db = dir.join("switchyard.db");
    let file = one_step(dir.path());
    let mut id = String::new();
    for n in 0..5 {
        id = run_ok(&db, &file, &format!(r#"{{"n": {n}}}"#)).await;
    }
    // A pipe whose reader is gone before the command writes: every write to
    // it fails with EPIPE, as in `switchyard runs list | head -c1`.
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let commands: [&[&str]; 6] = [
        &["runs", "list"],
        &["runs", "list", "--json"],
        &["runs", "show", &id],
        &["runs", "show", &id, "--journal", "--json"],
        &["validate", file.to_str().unwrap()],
        &["run", file.to_str().unwrap(), "--input", r#"{"n": 0}"#],
    ];
    for args in commands {
        let out = spawned_output_within(switchyard(&db).args(args).stdout(closed()).stderr(Stdio::piped())).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
    // With stderr closed too, and logs written to it.
    let out = spawned_output_within(
        switchyard(&db)
            .env("SWITCHYARD_LOG", "debug")
            .arg("run")
            .arg(&file)
            .args(["--input", r#"{"n": 0}"#])
            .stdout(closed())
            .stderr(closed()),
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn run_data_cannot_steer_the_terminal() {
    let dir = temp_dir("escapes");
    let db = dir.join("switchyard.db");
    let file = dir.join("esc.yaml");
    std::fs::write(
        &file,
        "name: \"esc\\e[31m\"\nsteps:\n  - id: boom\n    kind: fail\n    with:\n      message: \"before \\u001b[2J run succeeded \\u009b after \\u202e\"\n",
    )
    .unwrap();
    let raw = |text: &str| text.contains('\u{1b}') || text.contains('\u{9b}') || text.contains('\u{202e}');
    let out = output_within(switchyard(&db).arg("run").arg(&file)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!raw(&stderr), "{stderr:?}");
    assert!(stderr.contains("before \\u{1b}[2J run succeeded \\u{9b} after \\u{202e}"), "{stderr}");
    let id = stderr.split_whitespace().nth(1).unwrap().to_owned();

    for args in [&["runs", "show", &id, "--journal"][..], &["runs", "list"], &["runs", "list", "--json"]] {
        let out = output_within(switchyard(&db).args(args)).await;
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success() && !raw(&stdout), "{args:?}: {stdout:?}");
    }
    let out = output_within(switchyard(&db).args(["runs", "show", &id, "--json", "--journal"])).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!raw(&stdout), "{stdout:?}");
    // Escaped as JSON: the value is intact.
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["steps"][0]["error"]["message"], "before \u{1b}[2J run succeeded \u{9b} after \u{202e}");
    assert_eq!(shown["workflow"], "esc\u{1b}[31m");
}

#[tokio::test]
async fn input_from_a_device_fails_fast_and_a_bom_is_dropped() {
    let dir = temp_dir("input-file");
    let db = dir.join("switchyard.db");
    let file = one_step(dir.path());
    let out = output_within(switchyard(&db).arg("run").arg(&file).args(["--input", "@/dev/zero"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--input: cannot read /dev/zero: not a regular file"), "{stderr}");

    let with_bom = dir.join("input.json");
    std::fs::write(&with_bom, "\u{feff}{\"n\": 1}").unwrap();
    let from_file = format!("@{}", with_bom.display());
    for input in [from_file.as_str(), "\u{feff}{\"n\": 2}"] {
        let out = output_within(switchyard(&db).arg("run").arg(&file).args(["--input", input])).await;
        assert!(out.status.success(), "{input:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test]
async fn an_empty_or_in_memory_database_is_refused() {
    let dir = temp_dir("memory-db");
    let file = one_step(dir.path());
    for db in ["", "  ", "sqlite://", ":memory:", "sqlite::memory:", "sqlite://x.db?mode=memory"] {
        for args in [&["runs", "list"][..], &["run", file.to_str().unwrap()], &["worker", "--exit-when-idle"]] {
            let out = output_within(Command::new(BIN).current_dir(dir.path()).arg("--db").arg(db).args(args)).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{db:?} {args:?}: {stderr}");
            assert!(stderr.starts_with("error: --db "), "{db:?} {args:?}: {stderr}");
            assert!(!stderr.contains("no such table"), "{stderr}");
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing but the workflow file was created");
}

#[tokio::test]
async fn a_database_error_names_the_file_once() {
    let dir = temp_dir("db-errors");
    let file = one_step(dir.path());
    // A directory, and a file in a directory that does not exist.
    let missing = dir.join("missing").join("switchyard.db");
    for db in [dir.path(), missing.as_path()] {
        for args in [&["runs", "list"][..], &["run", file.to_str().unwrap()]] {
            let out = output_within(switchyard(db).args(args)).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr, format!("error: database {}: unable to open database file\n", db.display()));
        }
    }
}

#[tokio::test]
async fn runs_list_and_show_print_json() {
    let dir = temp_dir("json-out");
    let db = dir.join("switchyard.db");
    let file = one_step(dir.path());
    let first = run_ok(&db, &file, r#"{"n": 1}"#).await;
    let second = run_ok(&db, &file, r#"{"n": 2}"#).await;

    let out = output_within(switchyard(&db).args(["runs", "list", "--json"])).await;
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().expect("one JSON array");
    let ids: Vec<&str> = listed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.as_str(), first.as_str()], "newest first");
    let r = &listed[0];
    assert_eq!((&r["workflow"], &r["version"], &r["status"]), (&json!("one"), &json!(1), &json!("succeeded")));
    for time in ["created_at", "updated_at", "finished_at"] {
        assert!(r[format!("{time}_ms")].as_i64().unwrap() > 0, "{r}");
        assert!(r[time].as_str().unwrap().ends_with('Z'), "{r}");
    }

    let out = output_within(switchyard(&db).args(["runs", "show", &first, "--json"])).await;
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], first.as_str());
    assert_eq!(shown["root_id"], first.as_str());
    assert_eq!(shown["parent_id"], json!(null));
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["input"], json!({"n": 1}));
    assert_eq!(shown["output"], json!({"t": {"n": 1}}));
    assert_eq!(shown["error"], json!(null));
    assert_eq!(shown["wake_at"], json!(null));
    assert_eq!(shown["children"], json!([]));
    assert!(shown.get("journal").is_none(), "only with --journal");
    let step = &shown["steps"][0];
    assert_eq!((&step["id"], &step["status"], &step["attempts"]), (&json!("t"), &json!("succeeded"), &json!(1)));
    assert!(step["duration_ms"].as_i64().is_some() && step["error"].is_null() && step["note"].is_null(), "{step}");

    let out = output_within(switchyard(&db).args(["runs", "show", &first, "--json", "--journal"])).await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let journal = shown["journal"].as_array().unwrap();
    assert_eq!(journal[0]["event"]["type"], "run_started");
    assert_eq!(journal.last().unwrap()["event"]["type"], "run_finished");
    assert!(journal[0]["at_ms"].is_i64() && journal[0]["seq"].is_i64());
}

#[tokio::test]
async fn logs_on_a_pipe_carry_no_colour() {
    let dir = temp_dir("no-colour");
    let file = one_step(dir.path());
    let out = output_within(
        switchyard(&dir.join("switchyard.db"))
            .env("SWITCHYARD_LOG", "debug")
            .arg("run")
            .arg(&file)
            .args(["--input", r#"{"n": 0}"#]),
    )
    .await;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DEBUG"), "log lines are written: {stderr}");
    assert!(!stderr.contains("\u{1b}["), "{stderr}");
}

#[tokio::test]
async fn switchyard_signal_sends_a_signal_that_the_waiting_run_gets() {
    let dir = temp_dir("cli-signal");
    let db = dir.join("switchyard.db");
    let file = dir.join("gate.yaml");
    std::fs::write(
        &file,
        "name: gate\nsteps:\n  - {id: gate, kind: wait, with: {signal: approved}}\noutput: \"{{ steps.gate.output.payload.ok }} by {{ steps.gate.output.actor }}\"\n",
    )
    .unwrap();
    let mut running =
        switchyard(&db).arg("run").arg(&file).stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(running.stderr.take().unwrap()).lines();
    let line = stderr.next_line().await.unwrap().expect("run <id> started");
    let id = line.split_whitespace().nth(1).expect("run <id> started").to_owned();

    // Refused: a run that does not exist, a bad name, bad data.
    let out = switchyard(&db).args(["signal", "nope", "approved"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run \"nope\""), "{out:?}");
    let out = switchyard(&db).args(["signal", &id, "not a name"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = switchyard(&db).args(["signal", &id, "approved", "--data", "{oops"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data"), "{out:?}");

    // Sent now, whether or not the step waits yet: the run gets it.
    let out = switchyard(&db)
        .env("USER", "dana")
        .args(["signal", &id, "approved", "--data", r#"{"ok": true}"#])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("signal approved sent to run"), "{out:?}");
    let out = switchyard(&db).args(["signal", &id, "approved"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "a second signal of that name is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"), "{out:?}");

    let status = running.wait().await.unwrap();
    let mut stdout = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut running.stdout.take().unwrap(), &mut stdout).await.unwrap();
    assert!(status.success(), "{stdout}");
    assert_eq!(stdout.trim(), "\"True by cli:dana\"");
}

/// Acceptance: a map of 10,000 children that each wait for a signal. The
/// root parks; the process holding them stays under 100 MB; signalling them
/// all completes the run (the `signals` workload of `switchyard bench`).
#[tokio::test]
async fn ten_thousand_children_waiting_for_signals_park_and_complete() {
    let dir = temp_dir("bench-signals");
    let out = switchyard(&dir.join("db"))
        .args(["--sqlite-sync", "normal", "bench", "--workload", "signals"])
        .env("TMPDIR", dir.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((line["workload"].as_str(), line["n"].as_u64()), (Some("signals"), Some(10_000)), "{line}");
    assert_eq!(line["completed"], true, "{line}");
    assert!(line["peak_rss_mb"].as_f64().unwrap() < 100.0, "{line}");
    assert!(line["rss_bytes_per_parked_child"].as_f64().unwrap() <= 4096.0, "{line}");
}

/// The API key never leaves the provider: not in the database files, the
/// debug log, the CLI's output or `runs show`, even when a server echoes it
/// back in an error.
#[tokio::test]
async fn the_api_key_appears_in_no_file_log_or_output() {
    use switchyard_tests::{ModelServer, Reply};
    const KEY: &str = "sk-canary-c0ffee5ecret";
    let model = ModelServer::start().await;
    let dir = temp_dir("canary");
    let db = dir.join("switchyard.db");
    let file = dir.join("triage.yaml");
    std::fs::write(
        &file,
        r#"
name: canary
steps:
  - id: triage
    kind: decide
    with:
      prompt: "{{ input.text }}"
      choices: {bug: Broken., other: Else.}
  - id: summary
    kind: llm
    needs: [triage.bug]
    with: {prompt: "Summarise {{ input.text }}"}
output: "{{ steps.summary.output.text }}"
"#,
    )
    .unwrap();
    model.script_all([
        Reply::json(json!({"choice": "bug", "rationale": "r", "confidence": 0.9})),
        Reply::text("a summary"),
        // The second run: the server echoes the key in its error.
        Reply::status(401, json!({"error": {"message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error"}})),
    ]);
    let mut outputs = Vec::new();
    let command = |args: &[&str]| {
        let mut cmd = switchyard(&db);
        cmd.env("OPENAI_BASE_URL", model.base_url()).env("OPENAI_API_KEY", KEY).env("SWITCHYARD_LOG", "debug");
        cmd.args(args);
        cmd
    };
    let input = r#"{"text": "it crashes"}"#;
    let ok = command(&["run", file.to_str().unwrap(), "--input", input]).output().await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let failed = command(&["run", file.to_str().unwrap(), "--input", input]).output().await.unwrap();
    assert!(!failed.status.success());
    let failed_text = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(failed_text.contains("HTTP 401") && failed_text.contains("[redacted]"), "{failed_text}");
    outputs.extend([ok, failed]);
    let store = store(&dir).await;
    let runs = store.runs(None, true, 10).await.unwrap();
    assert_eq!(runs.len(), 2);
    for run in &runs {
        for args in [vec!["runs", "show", &run.id], vec!["runs", "show", &run.id, "--json", "--journal"]] {
            outputs.push(command(&args).output().await.unwrap());
        }
    }
    outputs.push(command(&["runs", "list", "--json"]).output().await.unwrap());
    // The key did reach the server, so the checks below can fail.
    assert!(model.requests().iter().all(|r| r.authorization.as_deref() == Some(&format!("Bearer {KEY}"))));
    for out in &outputs {
        for text in [&out.stdout, &out.stderr] {
            let text = String::from_utf8_lossy(text);
            assert!(!text.contains(KEY), "the key is in the output:\n{text}");
        }
    }
    let debug_lines: usize = outputs.iter().map(|o| String::from_utf8_lossy(&o.stderr).matches("DEBUG").count()).sum();
    assert!(debug_lines > 0, "the log ran at debug level");
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        // SQLite removes its -wal and -shm files as the last connection
        // closes, which may be while this looks: a file gone holds nothing.
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading {}: {e}", path.display()),
        };
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "the key is in {}", path.display());
    }
    model.stop().await;
}

/// Bad model-provider settings stop a command with exit 2 and a message
/// that names the variable (and never quotes a key).
#[tokio::test]
async fn bad_provider_settings_exit_2_naming_the_variable() {
    let dir = temp_dir("provider-env");
    let file = dir.join("wf.yaml");
    std::fs::write(&file, "name: t\nsteps:\n  - {id: t, kind: transform, with: {}}\n").unwrap();
    for (var, value, expected) in [
        ("OPENAI_BASE_URL", "not a url", "OPENAI_BASE_URL is not a URL"),
        ("OPENAI_BASE_URL", "ftp://127.0.0.1/v1", "OPENAI_BASE_URL must be an http or https URL"),
        ("SWITCHYARD_LLM_MAX_CONCURRENT", "0", "SWITCHYARD_LLM_MAX_CONCURRENT must be a whole number"),
        ("SWITCHYARD_LLM_TOKENS_PER_MINUTE", "lots", "SWITCHYARD_LLM_TOKENS_PER_MINUTE must be a whole number"),
        ("OPENAI_API_KEY", "sk-secret with space", "OPENAI_API_KEY: the API key has characters"),
    ] {
        let out = switchyard(&dir.join("db")).env(var, value).arg("run").arg(&file).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
        assert!(!stderr.contains("secret"), "{stderr}");
    }
    // A bad price table: `runs show` of a real run exits 2, naming it.
    let ok = switchyard(&dir.join("db")).arg("run").arg(&file).output().await.unwrap();
    assert!(ok.status.success());
    let stderr = String::from_utf8_lossy(&ok.stderr);
    let id = stderr.lines().last().and_then(|l| l.split_whitespace().nth(1)).unwrap().to_owned();
    let show = |prices: &'static str| {
        let mut cmd = switchyard(&dir.join("db"));
        cmd.env("SWITCHYARD_LLM_PRICES", prices).args(["runs", "show", &id]);
        cmd
    };
    let out = show(r#"{"m": {"input": -1, "output": 1}}"#).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SWITCHYARD_LLM_PRICES: m: prices are numbers of at least 0")
    );
    let out = show(r#"{"m": 1}"#).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(show(r#"{"m": {"input": 0.1, "output": 0.2}}"#).output().await.unwrap().status.success());
}
