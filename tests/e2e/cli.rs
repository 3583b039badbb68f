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
