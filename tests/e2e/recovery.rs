//! Crashes and recovery of the `switchyard` binary as real processes: a
//! cancel requested while the owner is dead, a rerun with an idempotency key
//! that takes a crashed run over, readers while another process holds the
//! write lock, and SIGKILLs at random points (seeded) of chains, maps and
//! recovering workers.
//!
//! Nothing here sleeps to wait: tests wait for calls at the `CounterServer`,
//! for lines on a process's stderr, or for a process to end, each under
//! [`LIMIT`]. The only timing is `SWITCHYARD_LEASE=1s` on processes that are
//! killed, so another process can take their runs over after a second.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::store::{JournalEntry, Store};
use switchyard_tests::{CounterServer, TempDir, temp_dir};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{journal, step_events, store};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");

/// How long anything a test waits for may take before it fails.
const LIMIT: Duration = Duration::from_secs(60);

/// The lease of every process a test may kill: its runs can be taken over
/// one second after it died.
const SHORT_LEASE: &str = "1s";

/// Seeds of the random kill points; each is printed before it is used. With
/// [`Plan::Anywhere`] they give 1, 2 and 4 kills.
const SEEDS: [u64; 3] = [2, 7, 0xdead_beef];

fn switchyard(db: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db").arg(db).env("SWITCHYARD_SQLITE_SYNC", "normal").kill_on_drop(true);
    cmd
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}

/// Runs `cmd` to its end, or fails the test after [`LIMIT`] (the child is
/// killed when the timed-out future drops it).
async fn output_within(cmd: &mut Command) -> std::process::Output {
    match tokio::time::timeout(LIMIT, cmd.output()).await {
        Ok(out) => out.expect("the binary starts"),
        Err(_) => panic!("{cmd:?} did not end within {LIMIT:?} (killed)"),
    }
}

/// A spawned `switchyard` process whose stderr is read line by line as it
/// comes and whose stdout is collected.
struct Proc {
    what: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line taken from `lines` so far.
    seen: Vec<String>,
    stdout: JoinHandle<String>,
}

impl Proc {
    fn spawn(what: impl Into<String>, cmd: &mut Command) -> Self {
        let what = what.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: the binary does not start: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text).await;
            text
        });
        Self { what, child, lines, seen: Vec::new(), stdout }
    }

    /// The next stderr line; `None` once the process closed stderr.
    async fn next_line(&mut self) -> Option<String> {
        let line = match tokio::time::timeout(LIMIT, self.lines.recv()).await {
            Ok(line) => line,
            Err(_) => panic!("{}: no stderr line within {LIMIT:?}; so far: {:?}", self.what, self.seen),
        };
        if let Some(l) = &line {
            self.seen.push(l.clone());
        }
        line
    }

    /// The run id from `run <id> ...` on the first stderr line.
    async fn run_id(&mut self) -> String {
        let first = self.next_line().await.unwrap_or_else(|| panic!("{}: no stderr at all", self.what));
        assert!(first.starts_with("run "), "{}: first line {first:?}", self.what);
        first.split_whitespace().nth(1).expect("run <id>").to_owned()
    }

    /// SIGKILLs the process as soon as the server has seen `n` calls to
    /// `name`. Fails if the process ends first.
    async fn kill_at_call(&mut self, server: &CounterServer, name: &str, n: usize) {
        let reached = tokio::time::timeout(LIMIT, async {
            tokio::select! {
                biased;
                () = server.wait_for_calls(name, n) => None,
                status = self.child.wait() => Some(status),
            }
        })
        .await;
        match reached {
            Ok(None) => {}
            Ok(Some(status)) => {
                let rest = self.finish().await.2;
                panic!("{} ended ({status:?}) before call {n} to {name}; stderr: {rest:?}", self.what)
            }
            Err(_) => panic!("{}: call {n} to {name} did not come within {LIMIT:?}", self.what),
        }
        self.kill().await;
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill(); // SIGKILL
        match tokio::time::timeout(LIMIT, self.child.wait()).await {
            Ok(status) => assert!(!status.expect("wait").success(), "{} was killed", self.what),
            Err(_) => panic!("{}: still alive {LIMIT:?} after SIGKILL", self.what),
        }
    }

    /// Waits for the end: exit status, stdout, and every stderr line.
    async fn finish(&mut self) -> (ExitStatus, String, Vec<String>) {
        let status = match tokio::time::timeout(LIMIT, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("{} did not end within {LIMIT:?} (killed); stderr so far: {:?}", self.what, self.seen)
            }
        };
        while self.next_line().await.is_some() {}
        let stdout = match tokio::time::timeout(LIMIT, &mut self.stdout).await {
            Ok(text) => text.unwrap_or_default(),
            Err(_) => panic!("{}: stdout not closed within {LIMIT:?}", self.what),
        };
        (status, stdout, self.seen.clone())
    }
}

/// A chain of `http` POSTs `s1 -> ... -> s{n}` to `/hit/s{k}`, each sending
/// the running total `1 + ... + k` (from its predecessor's echo); the output
/// is the last total. `hold` names a step whose first call is held.
fn chain_yaml(server: &CounterServer, name: &str, n: usize, hold: Option<usize>) -> String {
    let mut yaml = format!("name: {name}\nsteps:\n");
    for k in 1..=n {
        let held = if hold == Some(k) { "?hold_first=1" } else { "" };
        let url = server.url(&format!("/hit/s{k}{held}"));
        yaml.push_str(&format!("  - id: s{k}\n    kind: http\n"));
        if k > 1 {
            yaml.push_str(&format!("    needs: [s{}]\n", k - 1));
        }
        yaml.push_str(&format!("    with:\n      method: POST\n      url: \"{url}\"\n"));
        let prev = if k == 1 { "0".to_owned() } else { format!("steps.s{}.output.body.echo.total", k - 1) };
        yaml.push_str(&format!("      json: {{total: \"{{{{ {prev} + {k} }}}}\"}}\n"));
    }
    yaml.push_str(&format!("output: \"{{{{ steps.s{n}.output.body.echo.total }}}}\"\n"));
    yaml
}

fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write workflow");
    path
}

fn steps_started(j: &[JournalEntry], step: &str) -> Vec<u32> {
    step_events(j, step)
        .iter()
        .filter_map(|e| match e.event {
            Event::StepStarted { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect()
}

fn steps_succeeded(j: &[JournalEntry], step: &str) -> usize {
    step_events(j, step).iter().filter(|e| matches!(e.event, Event::StepSucceeded { .. })).count()
}

// 1. A cancel requested while the owner is dead.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_while_the_process_is_dead_wins_over_the_takeover() {
    let server = CounterServer::start().await;
    let dir = temp_dir("cancel-dead");
    let db = dir.join("switchyard.db");
    let file = write_file(&dir, "chain.yaml", &chain_yaml(&server, "cancel-dead", 10, Some(3)));

    let mut first = Proc::spawn("run", switchyard(&db).env("SWITCHYARD_LEASE", SHORT_LEASE).arg("run").arg(&file));
    let run_id = first.run_id().await;
    tokio::time::timeout(LIMIT, server.wait_for_held("s3")).await.expect("s3 is called and held");
    first.kill().await;
    let store = store(&dir).await;
    let lease_until = store.run(&run_id).await.unwrap().unwrap().lease_until.expect("the dead process's lease");

    let out = output_within(switchyard(&db).args(["runs", "cancel", &run_id])).await;
    let done_at = now_ms();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    if stdout.contains("requested") {
        // The dead process cannot stop it; the message must not say it will.
        assert!(
            stdout.contains(
                "or, if that process has died, the run ends cancelled when a worker or `runs resume` takes it over"
            ),
            "{stdout}"
        );
        assert_eq!(store.run(&run_id).await.unwrap().unwrap().status, RunStatus::Running);
    } else {
        // Only once the lease has expired may `cancel` end the run itself.
        assert_eq!(stdout.trim(), format!("run {run_id} cancelled"));
        assert!(done_at > lease_until, "cancelled before the dead process's lease expired: {stdout}");
        eprintln!("note: the lease expired before `runs cancel` ran; the takeover path was not exercised");
    }

    let mut worker = Proc::spawn(
        "worker",
        switchyard(&db).env("SWITCHYARD_LEASE", SHORT_LEASE).args(["worker", "--exit-when-idle"]),
    );
    let (status, _, stderr) = worker.finish().await;
    assert!(status.success(), "{stderr:?}");

    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled, "{:?}", run.error);
    assert_eq!(run.error.as_ref().map(|e| e.code.as_str()), Some("cancelled"));
    let counts: Vec<usize> = (4..=10).map(|k| server.count(&format!("s{k}"))).collect();
    assert_eq!(counts, [0; 7], "no step after the held one ran");
    assert_eq!(server.count("s3"), 1, "the cancelled run's in-flight step was not started again");
    let j = journal(&store, &run_id).await;
    assert_eq!(steps_started(&j, "s3"), [1], "the takeover started nothing");
    assert!(
        matches!(&j.last().unwrap().event, Event::RunFinished { status: RunStatus::Cancelled, .. }),
        "{:?}",
        j.last()
    );
    server.stop().await;
}

/// Starts `file`, SIGKILLs the process once every call in `held` is held,
/// requests a cancel while it is dead, and lets a worker take the run over.
/// Returns the run's id.
async fn cancel_while_dead_then_take_over(server: &CounterServer, db: &Path, file: &Path, held: &[&str]) -> String {
    let mut first = Proc::spawn("run", switchyard(db).env("SWITCHYARD_LEASE", SHORT_LEASE).arg("run").arg(file));
    let run_id = first.run_id().await;
    for name in held {
        tokio::time::timeout(LIMIT, server.wait_for_held(name)).await.expect("the call is made and held");
    }
    first.kill().await;
    let out = output_within(switchyard(db).args(["runs", "cancel", &run_id])).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut worker =
        Proc::spawn("worker", switchyard(db).env("SWITCHYARD_LEASE", SHORT_LEASE).args(["worker", "--exit-when-idle"]));
    let (status, _, stderr) = worker.finish().await;
    assert!(status.success(), "{stderr:?}");
    run_id
}

/// When the process that drives a run cancels it, "running actions stop at
/// once (their attempt is journaled as failed with `cancelled`)"
/// (ARCHITECTURE, Cancellation). When the run is cancelled while that
/// process is dead, its attempt in flight should end the same way, not stay
/// `running` in a finished run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_in_flight_when_its_process_died_ends_with_the_cancelled_run() {
    let server = CounterServer::start().await;
    let dir = temp_dir("cancel-dead-step");
    let db = dir.join("switchyard.db");
    let file = write_file(&dir, "chain.yaml", &chain_yaml(&server, "cancel-dead-step", 4, Some(3)));
    let run_id = cancel_while_dead_then_take_over(&server, &db, &file, &["s3"]).await;

    let store = store(&dir).await;
    assert_eq!(store.run(&run_id).await.unwrap().unwrap().status, RunStatus::Cancelled);
    let out = output_within(switchyard(&db).args(["runs", "show", &run_id, "--json"])).await;
    let shown: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let steps: BTreeMap<&str, (&Value, &Value)> = shown["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), (&s["status"], &s["error"]["code"])))
        .collect();
    assert_eq!(steps["s3"], (&json!("failed"), &json!("cancelled")), "s3 of a cancelled run: {shown}");
    let j = journal(&store, &run_id).await;
    let ended = step_events(&j, "s3").iter().any(|e| matches!(e.event, Event::StepFailed { .. }));
    assert!(ended, "s3's attempt has no end in the journal");
    server.stop().await;
}

/// `runs cancel` ends a run whose process died together with its unfinished
/// child runs when it can claim the run itself (ARCHITECTURE, Cancellation).
/// When a worker takes the run over with the cancel request instead, the
/// children must end too, not stay `running` under a cancelled root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_wins_over_a_takeover_ends_the_child_runs_too() {
    let server = CounterServer::start().await;
    let dir = temp_dir("cancel-dead-map");
    let db = dir.join("switchyard.db");
    let yaml = format!(
        r#"
name: cancel-dead-map
steps:
  - id: each
    kind: map
    with:
      items: [0, 1, 2, 3]
      concurrency: 2
      input: {{i: "{{{{ item }}}}"}}
      steps:
        - id: call
          kind: http
          with:
            url: "{base}/hit/item{{{{ input.i }}}}?hold_first=1"
"#,
        base = server.url(""),
    );
    let file = write_file(&dir, "map.yaml", &yaml);
    let run_id = cancel_while_dead_then_take_over(&server, &db, &file, &["item0", "item1"]).await;

    let store = store(&dir).await;
    assert_eq!(store.run(&run_id).await.unwrap().unwrap().status, RunStatus::Cancelled);
    assert_eq!((server.count("item2"), server.count("item3")), (0, 0), "no item started after the cancel");
    let children = store.children(&run_id).await.unwrap();
    assert_eq!(children.len(), 2, "{children:?}");
    for child in &children {
        assert_eq!(child.status, RunStatus::Cancelled, "child {} of a cancelled run", child.id);
        assert!(child.finished_at.is_some(), "{}", child.id);
    }
    server.stop().await;
}

// 2. Rerunning a crashed run with its idempotency key.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerunning_a_crashed_run_with_its_idempotency_key_takes_it_over() {
    let server = CounterServer::start().await;
    let dir = temp_dir("rerun-key");
    let db = dir.join("switchyard.db");
    let file = write_file(&dir, "chain.yaml", &chain_yaml(&server, "rerun-key", 5, Some(3)));
    let run_cmd = |lease: Option<&str>| {
        let mut cmd = switchyard(&db);
        if let Some(lease) = lease {
            cmd.env("SWITCHYARD_LEASE", lease);
        }
        cmd.arg("run").arg(&file).args(["--idempotency-key", "K1"]);
        cmd
    };

    let mut first = Proc::spawn("first run", &mut run_cmd(Some(SHORT_LEASE)));
    let run_id = first.run_id().await;
    tokio::time::timeout(LIMIT, server.wait_for_held("s3")).await.expect("s3 is called and held");
    first.kill().await;
    let store = store(&dir).await;
    let lease_until = store.run(&run_id).await.unwrap().unwrap().lease_until.expect("the dead process's lease");

    let mut again = Proc::spawn("second run", &mut run_cmd(None));
    let line = again.next_line().await.expect("a first line");
    assert_eq!(line, format!("run {run_id} already exists for this idempotency key"));
    let line = again.next_line().await.expect("a second line");
    let seen_at = now_ms();
    if line.contains("waiting for the lease") {
        assert!(line.contains(&run_id), "{line}");
    } else {
        // It may skip the wait only if it looked after the lease expired.
        assert!(seen_at > lease_until, "did not wait for a live lease; second line: {line:?}");
        eprintln!("note: the lease expired before the rerun looked; it did not have to wait");
    }
    let (status, stdout, stderr) = again.finish().await;
    assert!(status.success(), "{stderr:?}");
    assert_eq!(stdout.trim(), "15", "{stderr:?}");
    assert!(stderr.iter().any(|l| l == &format!("run {run_id} succeeded")), "{stderr:?}");

    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(run.output, Some(json!(15)));
    let counts: Vec<usize> = (1..=5).map(|k| server.count(&format!("s{k}"))).collect();
    assert_eq!(counts, [1, 1, 2, 1, 1], "only the step in flight ran again");
    let keys: Vec<Option<String>> = server.calls_to("s3").into_iter().map(|c| c.idempotency_key).collect();
    assert_eq!(keys, [Some(format!("{run_id}/s3")), Some(format!("{run_id}/s3"))]);
    assert_eq!(steps_started(&journal(&store, &run_id).await, "s3"), [1, 2]);
    let listed = store.runs(None, true, 100).await.unwrap();
    assert_eq!(listed.len(), 1, "the rerun started no second run");
    server.stop().await;
}

// 3. Readers while another process holds SQLite's write lock.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_work_while_another_process_holds_the_write_lock() {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    use sqlx::{Connection, Executor};

    let dir = temp_dir("write-lock");
    let db = dir.join("switchyard.db");
    let file = write_file(&dir, "one.yaml", "name: one\nsteps:\n  - id: t\n    kind: transform\n    with: {n: 7}\n");
    let out = output_within(switchyard(&db).arg("run").arg(&file)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run_id = stderr.split_whitespace().nth(1).expect("run <id> started").to_owned();
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"t": {"n": 7}}));

    let mut holder =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&db)).await.expect("open the database");
    holder.execute("BEGIN IMMEDIATE").await.expect("take the write lock");
    // It is held: another writer is refused at once.
    let mut other =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&db).busy_timeout(Duration::ZERO))
            .await
            .expect("open the database again");
    let refused = other.execute("BEGIN IMMEDIATE").await;
    assert!(refused.is_err(), "the write lock is not held");
    other.close().await.expect("close");

    let out = output_within(switchyard(&db).args(["runs", "list"])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "runs list: {}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().find(|l| l.starts_with(&run_id)).unwrap_or_else(|| panic!("no row for the run: {stdout}"));
    assert!(row.contains("one") && row.contains("succeeded"), "{row}");

    let out = output_within(switchyard(&db).args(["runs", "show", &run_id])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "runs show: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("run:      {run_id}")), "{stdout}");
    assert!(stdout.contains("status:   succeeded") && stdout.contains(r#"output:   {"t":{"n":7}}"#), "{stdout}");

    let out = output_within(switchyard(&db).args(["runs", "list", "--json"])).await;
    assert_eq!(out.status.code(), Some(0), "runs list --json: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((&listed[0]["id"], &listed[0]["status"]), (&json!(run_id), &json!("succeeded")));

    holder.execute("ROLLBACK").await.expect("release the write lock");
    holder.close().await.expect("close");
}

// 4. SIGKILLs at random points.

/// One step whose calls the server records under `name`.
#[derive(Debug, Clone)]
struct Target {
    /// The server-side name (`/hit/{name}`).
    name: String,
    /// The run whose journal holds the step (the root, or a map child).
    run: String,
    step: String,
    /// The `Idempotency-Key` every call must carry.
    key: String,
}

/// What the store and the server showed right after a kill (nothing runs).
#[derive(Debug, Clone, Default)]
struct Snapshot {
    finished: bool,
    /// Per target name: calls seen, attempts started, results journaled.
    calls: HashMap<String, usize>,
    started: HashMap<String, usize>,
    succeeded: HashMap<String, usize>,
}

impl Snapshot {
    async fn take(store: &dyn Store, server: &CounterServer, root: &str, targets: &[Target]) -> Self {
        let finished = store.run(root).await.unwrap().is_some_and(|r| r.status.is_finished());
        let mut journals: HashMap<&str, Vec<JournalEntry>> = HashMap::new();
        let mut snap = Snapshot { finished, ..Default::default() };
        for t in targets {
            if !journals.contains_key(t.run.as_str()) {
                journals.insert(&t.run, store.journal(&t.run).await.unwrap());
            }
            let j = &journals[t.run.as_str()];
            snap.calls.insert(t.name.clone(), server.count(&t.name));
            snap.started.insert(t.name.clone(), steps_started(j, &t.step).len());
            snap.succeeded.insert(t.name.clone(), steps_succeeded(j, &t.step));
        }
        snap
    }

    fn done(&self, t: &Target) -> bool {
        self.succeeded[&t.name] > 0
    }

    /// Started and without a result: the kill hit it in flight.
    fn in_flight(&self, t: &Target) -> bool {
        self.started[&t.name] > 0 && !self.done(t)
    }
}

/// Where a killed process's successor is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Between 1 and 4 kills, each at any step not yet done: the `run`
    /// process first, then workers.
    Anywhere,
    /// The `run` process at any step, then the worker that takes it over
    /// at one of the first three calls it makes, then a worker finishes.
    WhileRecovering,
}

/// A workflow under test: its file, input, and how its steps are found.
struct Scenario<'a> {
    file: &'a Path,
    input: Value,
    /// The steps to watch, given the root run's id.
    targets: &'a dyn Fn(&str) -> Vec<Target>,
    /// Targets the first kill may pick from (by index), so that a recovery
    /// has something left to do.
    first_kill_within: usize,
}

/// What happened: the run, its targets and the snapshot after each kill.
struct Crashed {
    run_id: String,
    targets: Vec<Target>,
    kills: Vec<Snapshot>,
}

/// Starts `switchyard run` and kills it and its successors (workers) at
/// random calls as `plan` says, then lets a last worker finish the run.
async fn run_with_kills(
    seed: u64,
    plan: Plan,
    server: &CounterServer,
    dir: &TempDir,
    scenario: &Scenario<'_>,
) -> Crashed {
    let db = dir.join("switchyard.db");
    let mut rng = StdRng::seed_from_u64(seed);
    let planned_kills = match plan {
        Plan::Anywhere => rng.random_range(1..=4usize),
        Plan::WhileRecovering => 2,
    };
    let input = scenario.input.to_string();
    let mut first = Proc::spawn(
        format!("seed {seed:#x}: run"),
        switchyard(&db).env("SWITCHYARD_LEASE", SHORT_LEASE).arg("run").arg(scenario.file).args(["--input", &input]),
    );
    let run_id = first.run_id().await;
    let targets = (scenario.targets)(&run_id);
    let store = store(dir).await;

    let at = rng.random_range(0..scenario.first_kill_within.min(targets.len()));
    eprintln!("seed {seed:#x}: {planned_kills} kills; run killed at call 1 to {}", targets[at].name);
    first.kill_at_call(server, &targets[at].name, 1).await;
    let mut kills = vec![Snapshot::take(&*store, server, &run_id, &targets).await];

    for round in 1..planned_kills {
        let last = kills.last().expect("a snapshot");
        if last.finished {
            break;
        }
        let open: Vec<&Target> = targets.iter().filter(|t| !last.done(t)).collect();
        let pick = match plan {
            Plan::Anywhere => rng.random_range(0..open.len()),
            Plan::WhileRecovering => rng.random_range(0..open.len().min(3)),
        };
        let (name, n) = (&open[pick].name, last.calls[&open[pick].name] + 1);
        eprintln!("seed {seed:#x}: worker {round} killed at call {n} to {name}");
        let mut worker = Proc::spawn(
            format!("seed {seed:#x}: worker {round}"),
            switchyard(&db).env("SWITCHYARD_LEASE", SHORT_LEASE).args(["worker", "--exit-when-idle"]),
        );
        worker.kill_at_call(server, name, n).await;
        kills.push(Snapshot::take(&*store, server, &run_id, &targets).await);
    }
    if plan == Plan::WhileRecovering {
        assert_eq!(kills.len(), 2, "seed {seed:#x}: the run was not killed twice");
        assert!(!kills[1].finished, "seed {seed:#x}: the first worker finished the run before its kill landed");
    }

    if !kills.last().expect("a snapshot").finished {
        let mut last = Proc::spawn(
            format!("seed {seed:#x}: last worker"),
            switchyard(&db).env("SWITCHYARD_LEASE", SHORT_LEASE).args(["worker", "--exit-when-idle"]),
        );
        let (status, _, stderr) = last.finish().await;
        assert!(status.success(), "seed {seed:#x}: the last worker failed: {stderr:?}");
    }
    Crashed { run_id, targets, kills }
}

/// Nothing lost, nothing done twice that was done before a kill, and every
/// repeat a repeat of the same idempotent call. Returns how many calls were
/// repeats.
async fn check_after_kills(seed: u64, store: &dyn Store, server: &CounterServer, crashed: &Crashed) -> usize {
    let Crashed { run_id, targets, kills } = crashed;
    let roots = store.runs(None, false, 100).await.unwrap();
    assert_eq!(roots.len(), 1, "seed {seed:#x}: one root run, none lost or added: {roots:?}");
    assert_eq!(&roots[0].id, run_id);
    assert_eq!(roots[0].status, RunStatus::Succeeded, "seed {seed:#x}: {:?}", roots[0].error);
    assert!(!store.run(run_id).await.unwrap().unwrap().cancel_requested);

    let end = Snapshot::take(store, server, run_id, targets).await;
    let calls: BTreeMap<String, Vec<Option<String>>> = targets
        .iter()
        .map(|t| (t.name.clone(), server.calls_to(&t.name).into_iter().map(|c| c.idempotency_key).collect()))
        .collect();
    for t in targets {
        let ctx = format!("seed {seed:#x}, {} ({} in {})", t.name, t.step, t.run);
        assert_eq!(end.succeeded[&t.name], 1, "{ctx}: one result");
        let hits = kills.iter().filter(|k| k.in_flight(t)).count();
        let n = end.calls[&t.name];
        assert!(n >= 1, "{ctx}: never called");
        assert!(n <= 1 + hits, "{ctx}: called {n} times, but only {hits} kills hit it in flight");
        assert!(n <= end.started[&t.name], "{ctx}: {n} calls from {} attempts", end.started[&t.name]);
        // Attempts are numbered 1, 2, ... and each kill adds at most one.
        let journal = store.journal(&t.run).await.unwrap();
        let attempts = steps_started(&journal, &t.step);
        let expected: Vec<u32> = (1..=attempts.len() as u32).collect();
        assert_eq!(attempts, expected, "{ctx}");
        assert!(attempts.len() <= 1 + hits, "{ctx}: {} attempts, {hits} kills hit it", attempts.len());
        for (k, before) in kills.iter().enumerate() {
            if before.done(t) {
                assert_eq!(n, before.calls[&t.name], "{ctx}: done before kill {k}, called again after it");
                assert_eq!(end.started[&t.name], before.started[&t.name], "{ctx}: started again after kill {k}");
            }
        }
        let keys = &calls[&t.name];
        assert!(keys.iter().all(|k| k.as_deref() == Some(t.key.as_str())), "{ctx}: keys {keys:?}, want {}", t.key);
    }
    let repeated: usize = targets.iter().map(|t| end.calls[&t.name] - 1).sum();
    eprintln!("seed {seed:#x}: {} kills, {repeated} calls repeated", kills.len());
    repeated
}

fn chain_targets(n: usize) -> impl Fn(&str) -> Vec<Target> {
    move |run: &str| {
        (1..=n)
            .map(|k| Target {
                name: format!("s{k}"),
                run: run.to_owned(),
                step: format!("s{k}"),
                key: format!("{run}/s{k}"),
            })
            .collect()
    }
}

/// Returns how many calls were repeats.
async fn chain_with_kills(label: &str, plan: Plan, seed: u64) -> usize {
    eprintln!("{label}: seed {seed:#x}");
    const STEPS: usize = 40;
    let server = CounterServer::start().await;
    let dir = temp_dir(label);
    let file = write_file(&dir, "chain.yaml", &chain_yaml(&server, label, STEPS, None));
    let targets = chain_targets(STEPS);
    let scenario = Scenario {
        file: &file,
        input: json!({}),
        targets: &targets,
        // A run killed late may finish before the kill lands; a worker killed
        // while recovering needs steps left after it.
        first_kill_within: if plan == Plan::WhileRecovering { 25 } else { STEPS },
    };
    let crashed = run_with_kills(seed, plan, &server, &dir, &scenario).await;
    let store = store(&dir).await;
    let repeated = check_after_kills(seed, &*store, &server, &crashed).await;
    let run = store.run(&crashed.run_id).await.unwrap().unwrap();
    assert_eq!(run.output, Some(json!(STEPS * (STEPS + 1) / 2)), "seed {seed:#x}");
    let j = journal(&store, &crashed.run_id).await;
    let finished = j.iter().filter(|e| matches!(e.event, Event::RunFinished { .. })).count();
    assert_eq!(finished, 1, "seed {seed:#x}: one end");
    server.stop().await;
    repeated
}

/// A kill lands right after a call reaches the server, mostly before its
/// result is journaled: over all seeds, some calls must have been repeated,
/// or the kills did not hit steps in flight and the test proves little.
fn assert_some_repeats(repeated: usize) {
    assert!(repeated > 0, "no kill hit a step in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_40_step_http_chain_at_random_points_loses_nothing() {
    let mut repeated = 0;
    for seed in SEEDS {
        repeated += chain_with_kills("kill-chain", Plan::Anywhere, seed).await;
    }
    assert_some_repeats(repeated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_while_it_recovers_loses_nothing() {
    let mut repeated = 0;
    for seed in SEEDS {
        repeated += chain_with_kills("kill-recovering", Plan::WhileRecovering, seed).await;
    }
    assert_some_repeats(repeated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_map_at_random_points_loses_nothing() {
    const ITEMS: usize = 30;
    let mut repeated = 0;
    for seed in SEEDS {
        eprintln!("kill-map: seed {seed:#x}");
        let server = CounterServer::start().await;
        let dir = temp_dir("kill-map");
        // Each item's call has its own server name, `item{i}`.
        let yaml = format!(
            r#"
name: kill-map
steps:
  - id: each
    kind: map
    with:
      items: "{{{{ range(input.n) | list }}}}"
      concurrency: 5
      input: {{i: "{{{{ item }}}}"}}
      steps:
        - id: call
          kind: http
          with:
            method: POST
            url: "{base}/hit/item{{{{ input.i }}}}"
            json: {{i: "{{{{ input.i }}}}"}}
      output: "{{{{ steps.call.output.body.echo.i * 3 + 1 }}}}"
output: "{{{{ steps.each.output }}}}"
"#,
            base = server.url(""),
        );
        let file = write_file(&dir, "map.yaml", &yaml);
        let targets = |run: &str| -> Vec<Target> {
            (0..ITEMS)
                .map(|i| Target {
                    name: format!("item{i}"),
                    run: format!("{run}/each/{i}"),
                    step: "call".to_owned(),
                    key: format!("{run}/each/{i}/call"),
                })
                .collect()
        };
        let scenario =
            Scenario { file: &file, input: json!({"n": ITEMS}), targets: &targets, first_kill_within: ITEMS };
        let crashed = run_with_kills(seed, Plan::Anywhere, &server, &dir, &scenario).await;
        let store = store(&dir).await;
        repeated += check_after_kills(seed, &*store, &server, &crashed).await;

        let run_id = &crashed.run_id;
        let run = store.run(run_id).await.unwrap().unwrap();
        let expected: Vec<Value> = (0..ITEMS).map(|i| json!(i * 3 + 1)).collect();
        assert_eq!(run.output, Some(Value::Array(expected)), "seed {seed:#x}: outputs in item order");
        let j = journal(&store, run_id).await;
        assert_eq!(steps_succeeded(&j, "each"), 1, "seed {seed:#x}");
        let map_hits = crashed.kills.iter().filter(|k| !k.finished).count();
        assert!(steps_started(&j, "each").len() <= 1 + map_hits, "seed {seed:#x}");
        let children = store.children(run_id).await.unwrap();
        assert_eq!(children.len(), ITEMS, "seed {seed:#x}: one child per item");
        for child in &children {
            assert_eq!(child.status, RunStatus::Succeeded, "seed {seed:#x}: child {}", child.id);
            let cj = journal(&store, &child.id).await;
            let finished = cj.iter().filter(|e| matches!(e.event, Event::RunFinished { .. })).count();
            assert_eq!(finished, 1, "seed {seed:#x}: child {}", child.id);
        }
        server.stop().await;
    }
    assert_some_repeats(repeated);
}

// 5. An agent killed in the middle of its loop.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_repeats_no_completed_model_or_tool_call() {
    use switchyard_tests::{ModelServer, Reply};
    let server = CounterServer::start().await;
    let model = ModelServer::start().await;
    let dir = temp_dir("agent-kill");
    let db = dir.join("switchyard.db");
    let yaml = format!(
        r#"
name: oncall
steps:
  - id: agent
    kind: agent
    with:
      prompt: Look around.
      tools:
        - {{name: alerts, description: Alerts., http: {{url: "{a}"}}}}
        - {{name: deploys, description: Deploys., http: {{url: "{b}"}}}}
output: "{{{{ steps.agent.output.text }}}}"
"#,
        a = server.url("/hit/a"),
        b = server.url("/hit/b?hold_first=1"),
    );
    let file = write_file(&dir, "agent.yaml", &yaml);
    model.script_all([
        Reply::tool_calls(vec![("alerts", json!({}))]),
        Reply::tool_calls(vec![("deploys", json!({}))]),
        Reply::text("done"),
    ]);
    let run_cmd = |lease: Option<&str>| {
        let mut cmd = switchyard(&db);
        cmd.env("OPENAI_BASE_URL", model.base_url()).env("OPENAI_API_KEY", "sk-test");
        if let Some(lease) = lease {
            cmd.env("SWITCHYARD_LEASE", lease);
        }
        cmd.arg("run").arg(&file).args(["--idempotency-key", "A1"]);
        cmd
    };
    let mut first = Proc::spawn("agent run", &mut run_cmd(Some(SHORT_LEASE)));
    let run_id = first.run_id().await;
    tokio::time::timeout(LIMIT, server.wait_for_held("b")).await.expect("the second tool is called and held");
    first.kill().await;
    assert_eq!((model.count(), server.count("a")), (2, 1));

    let mut again = Proc::spawn("agent rerun", &mut run_cmd(None));
    let (status, stdout, stderr) = again.finish().await;
    assert!(status.success(), "{stderr:?}");
    assert_eq!(stdout.trim(), "\"done\"", "{stderr:?}");
    // Both answered model calls and the finished tool call were replayed;
    // only the call in flight at the kill ran again (with the same key).
    assert_eq!(model.count(), 3, "no answered model call is sent again");
    assert_eq!((server.count("a"), server.count("b")), (1, 2));
    let keys: Vec<Option<String>> = server.calls_to("b").into_iter().map(|c| c.idempotency_key).collect();
    assert_eq!(keys, [Some(format!("{run_id}/agent/tool/1")), Some(format!("{run_id}/agent/tool/1"))]);
    model.stop().await;
    server.stop().await;
}
