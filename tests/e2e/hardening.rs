//! Hardening, in-process: every run ends cleanly (panicking steps, failed
//! commits, resumed switches), hostile templates and data stay bounded, and a
//! template sees only its upstream steps.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_orchestrator::compile::compile_file;
use switchyard_orchestrator::engine::Error as EngineError;
use switchyard_orchestrator::journal::{Event, RunStatus};
use switchyard_orchestrator::store::{self, Claim, Fence, JournalEntry, RunRecord, Store, Write};
use switchyard_orchestrator::workflow::Bundle;
use switchyard_orchestrator::{Definition, Engine, EngineOptions};
use switchyard_steps::{Registry, Step, StepContext, StepResult, SystemClock};
use switchyard_tests::{CounterServer, TempDir, temp_dir};

use crate::support::{registry, store};

/// Fails when told to, for as long as it is told.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PanicConfig {
    #[serde(default)]
    after_await: bool,
}

struct Panics;

impl Step for Panics {
    const KIND: &'static str = "panics";
    type Config = PanicConfig;
    type Output = Value;

    async fn run(&self, config: PanicConfig, _ctx: &mut StepContext) -> StepResult<Value> {
        if config.after_await {
            tokio::task::yield_now().await;
        }
        panic!("the step broke");
    }
}

/// Chooses `choose` among its declared `paths`, like a decision node.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PickConfig {
    paths: Vec<String>,
    choose: String,
}

struct Pick;

impl Step for Pick {
    const KIND: &'static str = "pick";
    type Config = PickConfig;
    type Output = Value;

    fn paths(config: &PickConfig) -> Option<Vec<String>> {
        Some(config.paths.clone())
    }

    async fn run(&self, config: PickConfig, _ctx: &mut StepContext) -> StepResult<Value> {
        Ok(json!({ "path": config.choose }))
    }
}

fn test_registry() -> Registry {
    registry().with(Panics).with(Pick)
}

fn compile_with(dir: &TempDir, name: &str, yaml: &str) -> Definition {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    compile_file(&path, &test_registry()).unwrap_or_else(|e| panic!("{name} does not compile:\n{e}"))
}

fn start(store: Arc<dyn Store>, worker: bool) -> Engine {
    let options = EngineOptions { worker, poll_interval: Duration::from_millis(50), ..Default::default() };
    Engine::start(store, test_registry(), Arc::new(SystemClock), options)
}

/// Bounds a wait that must end; a hang fails the test instead of blocking CI.
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), fut).await.unwrap_or_else(|_| panic!("{what} did not end"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_its_attempt_and_the_engine_goes_on() {
    let dir = temp_dir("panic");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    for after_await in [false, true] {
        let yaml = format!(
            "name: p\nsteps:\n  - id: boom\n    kind: panics\n    with: {{after_await: {after_await}}}\n    retry: {{max_attempts: 2, initial_delay: 1ms}}\n"
        );
        let def = compile_with(&dir, "p.yaml", &yaml);
        let outcome = within("a run whose step panics", engine.run(&def, json!({}))).await.unwrap();
        assert_eq!(outcome.status, RunStatus::Failed);
        let error = outcome.error.unwrap();
        assert_eq!(error.code, "panic");
        assert!(error.message.contains("the step broke"), "{}", error.message);
        let row = store.run(&outcome.id).await.unwrap().unwrap();
        assert_eq!((row.status, row.owner), (RunStatus::Failed, None));
    }
    // The engine still runs other work.
    let def = compile_with(&dir, "ok.yaml", "name: ok\nsteps:\n  - {id: t, kind: transform, with: {v: 1}}\n");
    assert_eq!(engine.run(&def, json!({})).await.unwrap().status, RunStatus::Succeeded);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_run_whose_switch_failed_decides_it_again() {
    let dir = temp_dir("switchresume");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    let def = compile_with(
        &dir,
        "s.yaml",
        "name: s\nsteps:\n  - id: route\n    kind: switch\n    with: {cases: [{when: \"input.flag.deep\", path: a}], default: b}\n  - {id: a, kind: transform, needs: [route.a], with: {}}\n",
    );
    let outcome = within("the first run", engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.error.as_ref().unwrap().code, "expression");
    engine.resume_as(&outcome.id, Some("ops:bob")).await.unwrap();
    let again = within("the resumed run", engine.wait(&outcome.id)).await.unwrap();
    assert_eq!(again.status, RunStatus::Failed, "the same input fails the same way");
    let journal = store.journal(&outcome.id).await.unwrap();
    assert!(
        journal.iter().any(|e| e.event == Event::RunResumed { actor: Some("ops:bob".into()) }),
        "who resumed is journaled"
    );
    let row = store.run(&outcome.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.owner), (RunStatus::Failed, None));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_cancelled_a_run_is_journaled() {
    let server = CounterServer::start().await;
    let dir = temp_dir("cancelactor");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    let def = compile_with(&dir, "c.yaml", &chain(&server, "ca", 2, Some(1)));
    let id = engine.submit(&def, json!({})).await.unwrap();
    within("step 1 to be called", server.wait_for_held("ca1")).await;
    engine.cancel_as(&id, Some("ops:carol")).await.unwrap();
    let journal = store.journal(&id).await.unwrap();
    let tail: Vec<&Event> = journal.iter().rev().take(2).map(|e| &e.event).collect();
    assert!(matches!(tail[0], Event::RunFinished { status: RunStatus::Cancelled, .. }), "{tail:?}");
    assert_eq!(tail[1], &Event::CancelRequested { actor: Some("ops:carol".into()) });
    engine.shutdown().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_chooses_a_path_routes_like_a_switch() {
    let dir = temp_dir("pick");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    let yaml = |choose: &str| {
        format!(
            "name: pick\nsteps:\n  - {{id: triage, kind: pick, with: {{paths: [refund, bug], choose: {choose}}}}}\n  - {{id: refund, kind: transform, needs: [triage.refund], with: {{r: 1}}}}\n  - {{id: bug, kind: transform, needs: [triage.bug], with: {{b: 1}}}}\n  - {{id: done, kind: transform, needs: [refund, bug], join: any, with: {{d: 1}}}}\n"
        )
    };
    let def = compile_with(&dir, "pick.yaml", &yaml("bug"));
    let outcome = within("a picking run", engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    let out = outcome.output.unwrap();
    assert!(out.get("done").is_some() && out.get("refund").is_none(), "{out}");
    // A path it did not declare fails the step, and compile rejects needs on one.
    let def = compile_with(&dir, "pick2.yaml", &yaml("other"));
    let outcome = within("a run choosing no declared path", engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.error.unwrap().code, "invalid_path");
    let bad = "name: p\nsteps:\n  - {id: t, kind: pick, with: {paths: [a], choose: a}}\n  - {id: u, kind: transform, needs: [t.zzz]}\n";
    std::fs::write(dir.join("bad.yaml"), bad).unwrap();
    let errors = compile_file(&dir.join("bad.yaml"), &test_registry()).unwrap_err().to_string();
    assert!(errors.contains("steps[1].needs[0]") && errors.contains("no path \"zzz\""), "{errors}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_see_only_upstream_steps_and_bombs_fail_the_step() {
    let dir = temp_dir("scope");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    let def = compile_with(
        &dir,
        "scope.yaml",
        r#"
name: scope
steps:
  - {id: a, kind: transform, with: {v: 1}}
  - {id: b, kind: transform, needs: [a], with: {v: 2}}
  - {id: c, kind: transform, needs: [b], with: {v: 3}}
  - {id: d, kind: transform, needs: [a], with: {seen: "{{ steps | list }}"}}
  - {id: e, kind: transform, needs: [c, d], with: {seen: "{{ steps | list }}"}}
"#,
    );
    for _ in 0..5 {
        let outcome = within("a scoped run", engine.run(&def, json!({}))).await.unwrap();
        let out = outcome.output.unwrap();
        assert_eq!(out["e"]["seen"], json!(["a", "b", "c", "d"]));
    }
    // A dynamic lookup of a step that is not upstream finds nothing.
    let def = compile_with(
        &dir,
        "peek.yaml",
        "name: peek\nsteps:\n  - {id: a, kind: transform, with: {v: 1}}\n  - {id: b, kind: transform, needs: [a], with: {v: \"{{ steps[input.k].output }}\"}}\n  - {id: c, kind: transform, with: {secret: 1}}\n",
    );
    let outcome = within("a peeking run", engine.run(&def, json!({"k": "c"}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.error.unwrap().code, "expression");
    // A huge lazy list fails the step; the process and the engine go on.
    let def = compile_with(
        &dir,
        "bomb.yaml",
        "name: bomb\nsteps:\n  - {id: a, kind: transform, with: {v: \"{{ [0] * 100000000 }}\"}}\n",
    );
    let outcome = within("a bomb", engine.run(&def, json!({}))).await.unwrap();
    let error = outcome.error.unwrap();
    assert_eq!(error.code, "expression");
    assert!(error.message.contains("larger than"), "{}", error.message);
    // namespace() is gone: the deep-nesting template does not even compile.
    let deep = "name: deep\nsteps:\n  - id: a\n    kind: transform\n    with: {v: \"{% set ns = namespace(x=1) %}{% for i in range(10000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}\"}\n";
    std::fs::write(dir.join("deep.yaml"), deep).unwrap();
    let errors = compile_file(&dir.join("deep.yaml"), &test_registry()).unwrap_err().to_string();
    assert!(errors.contains("namespace"), "{errors}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_deep_outputs_are_refused_when_produced_and_the_run_stays_readable() {
    let dir = temp_dir("deepdata");
    let store = store(&dir).await;
    let engine = start(store.clone(), false);
    let wrap = |inner: &str| format!("{}{inner}{}", "[".repeat(40), "]".repeat(40));
    let yaml = format!(
        "name: deep\nsteps:\n  - {{id: a, kind: transform, with: {{v: \"{{{{ {} }}}}\"}}}}\n  - {{id: b, kind: transform, needs: [a], with: {{v: \"{{{{ {} }}}}\"}}}}\n",
        wrap("1"),
        wrap("steps.a.output.v")
    );
    let def = compile_with(&dir, "deep.yaml", &yaml);
    let outcome = within("a deep run", engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Failed);
    assert!(outcome.error.unwrap().message.contains("levels deep"));
    // Everything written reads back, and the run can be resumed.
    store.journal(&outcome.id).await.unwrap();
    store.run(&outcome.id).await.unwrap().unwrap();
    engine.resume(&outcome.id).await.unwrap();
    assert_eq!(within("the resumed run", engine.wait(&outcome.id)).await.unwrap().status, RunStatus::Failed);
    // Too-deep input is refused before anything is stored.
    let mut input = json!(1);
    for _ in 0..70 {
        input = json!([input]);
    }
    let def = compile_with(&dir, "t.yaml", "name: t\nsteps:\n  - {id: a, kind: transform, with: {}}\n");
    assert!(matches!(engine.submit(&def, input).await, Err(EngineError::InvalidInput(_))));
    // A map takes at most 100,000 items.
    let def = compile_with(
        &dir,
        "m.yaml",
        "name: m\nsteps:\n  - id: m\n    kind: map\n    with: {items: \"{{ input.items }}\", steps: [{id: x, kind: transform, with: {}}]}\n",
    );
    let items: Vec<u32> = (0..100_001).collect();
    let outcome = within("a huge map", engine.run(&def, json!({ "items": items }))).await.unwrap();
    assert_eq!(outcome.error.unwrap().code, "map_items");
    engine.shutdown().await;
}

/// A store that fails chosen commits: `transient` ones report the database
/// busy (and are retried by the writer), `hard` ones fail outright.
struct FaultyStore {
    inner: Arc<dyn Store>,
    commits: AtomicUsize,
    /// Commits numbered from 1; those in `fail_from..fail_until` fail.
    fail_from: AtomicUsize,
    fail_until: AtomicUsize,
    transient: bool,
}

impl FaultyStore {
    fn new(inner: Arc<dyn Store>, transient: bool) -> Arc<Self> {
        Arc::new(Self {
            inner,
            commits: AtomicUsize::new(0),
            fail_from: AtomicUsize::new(usize::MAX),
            fail_until: AtomicUsize::new(usize::MAX),
            transient,
        })
    }

    /// Fails the next `n` commits.
    fn fail_next(&self, n: usize) {
        let now = self.commits.load(Ordering::SeqCst);
        self.fail_until.store(now + 1 + n, Ordering::SeqCst);
        self.fail_from.store(now + 1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn put_definition(
        &self,
        hash: &str,
        name: &str,
        version: u32,
        bundle: &Bundle,
        now: i64,
    ) -> store::Result<()> {
        self.inner.put_definition(hash, name, version, bundle, now).await
    }
    async fn definition(&self, hash: &str) -> store::Result<Bundle> {
        self.inner.definition(hash).await
    }
    async fn commit(&self, node: &str, now: i64, writes: &[Write]) -> store::Result<Vec<store::Result<()>>> {
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.fail_from.load(Ordering::SeqCst) && n < self.fail_until.load(Ordering::SeqCst) {
            return Err(if self.transient {
                store::Error::Unavailable("injected: database is locked".into())
            } else {
                store::Error::Corrupt("injected: the disk went away".into())
            });
        }
        self.inner.commit(node, now, writes).await
    }
    async fn run(&self, id: &str) -> store::Result<Option<RunRecord>> {
        self.inner.run(id).await
    }
    async fn run_by_key(&self, key: &str) -> store::Result<Option<RunRecord>> {
        self.inner.run_by_key(key).await
    }
    async fn runs(&self, status: Option<RunStatus>, children: bool, limit: i64) -> store::Result<Vec<RunRecord>> {
        self.inner.runs(status, children, limit).await
    }
    async fn children(&self, parent: &str) -> store::Result<Vec<RunRecord>> {
        self.inner.children(parent).await
    }
    async fn journal(&self, id: &str) -> store::Result<Vec<JournalEntry>> {
        self.inner.journal(id).await
    }
    async fn next_seq(&self, id: &str) -> store::Result<i64> {
        self.inner.next_seq(id).await
    }
    async fn claim(
        &self,
        id: &str,
        node: &str,
        seen: i64,
        lease: Duration,
        finished: bool,
    ) -> store::Result<Option<Claim>> {
        self.inner.claim(id, node, seen, lease, finished).await
    }
    async fn claimable(&self, now: i64, limit: i64) -> store::Result<Vec<RunRecord>> {
        self.inner.claimable(now, limit).await
    }
    async fn claim_due(
        &self,
        node: &str,
        now: i64,
        lease: Duration,
        limit: i64,
    ) -> store::Result<Vec<(RunRecord, Claim)>> {
        self.inner.claim_due(node, now, lease, limit).await
    }
    async fn next_wakes(&self, now: i64, limit: i64) -> store::Result<Vec<(String, i64)>> {
        self.inner.next_wakes(now, limit).await
    }
    async fn parked_count(&self) -> store::Result<u64> {
        self.inner.parked_count().await
    }
    async fn renew(&self, node: &str, ids: &[String], lease: Duration) -> store::Result<u64> {
        self.inner.renew(node, ids, lease).await
    }
    async fn release(&self, node: &str, fence: &Fence) -> store::Result<()> {
        self.inner.release(node, fence).await
    }
    async fn release_all(&self, node: &str) -> store::Result<()> {
        self.inner.release_all(node).await
    }
    async fn cancel_requests(&self, node: &str) -> store::Result<Vec<(String, Option<String>)>> {
        self.inner.cancel_requests(node).await
    }
    async fn request_cancel(&self, id: &str, actor: Option<&str>, now: i64) -> store::Result<()> {
        self.inner.request_cancel(id, actor, now).await
    }
    async fn signal(
        &self,
        run: &str,
        name: &str,
        payload: &Value,
        actor: Option<&str>,
        now: i64,
        require_waiting: bool,
    ) -> store::Result<store::Signalled> {
        self.inner.signal(run, name, payload, actor, now, require_waiting).await
    }
    async fn signals(&self, run: &str) -> store::Result<Vec<switchyard_steps::Signal>> {
        self.inner.signals(run).await
    }
    async fn signalled(&self, root: &str) -> store::Result<Vec<String>> {
        self.inner.signalled(root).await
    }
    async fn signalled_roots(&self) -> store::Result<Vec<String>> {
        self.inner.signalled_roots().await
    }
    async fn child_states(&self, parent: &str) -> store::Result<Vec<store::ChildState>> {
        self.inner.child_states(parent).await
    }
}

fn chain(server: &CounterServer, name: &str, steps: usize, hold: Option<usize>) -> String {
    let mut yaml = format!("name: {name}\nsteps:\n");
    for k in 1..=steps {
        let hold = if Some(k) == hold { "?hold_first=1" } else { "" };
        let url = server.url(&format!("/hit/{name}{k}{hold}"));
        let needs = if k > 1 { format!(", needs: [s{}]", k - 1) } else { String::new() };
        yaml.push_str(&format!("  - {{id: s{k}, kind: http{needs}, with: {{url: \"{url}\"}}}}\n"));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_commits_are_retried_and_the_run_succeeds() {
    let server = CounterServer::start().await;
    let dir = temp_dir("busy");
    let faulty = FaultyStore::new(store(&dir).await, true);
    let engine = start(faulty.clone(), false);
    let def = compile_with(&dir, "busy.yaml", &chain(&server, "busy", 4, None));
    faulty.fail_next(3);
    let outcome = within("a run through a busy database", engine.run(&def, json!({}))).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    for k in 1..=4 {
        assert_eq!(server.count(&format!("busy{k}")), 1);
    }
    engine.shutdown().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_leaves_the_run_resumable_at_once() {
    let server = CounterServer::start().await;
    let dir = temp_dir("hardfail");
    let plain = store(&dir).await;
    let faulty = FaultyStore::new(plain.clone(), false);
    let engine = start(faulty.clone(), false);
    let def = compile_with(&dir, "hard.yaml", &chain(&server, "hard", 4, Some(2)));
    let id = engine.submit(&def, json!({})).await.unwrap();
    // While step 2 is in flight the disk fails: its result cannot be journaled.
    within("step 2 to be called", server.wait_for_held("hard2")).await;
    faulty.fail_next(usize::MAX / 2);
    server.release("hard2");
    let waited = within("the broken run", engine.wait(&id)).await;
    assert!(matches!(waited, Err(EngineError::Interrupted(..))), "{waited:?}");
    // The lease was given back at once (the default lease is 30 s, and this
    // must not wait for it): a worker on a healthy store takes the run over.
    let row = plain.run(&id).await.unwrap().unwrap();
    assert_eq!((row.status, row.owner), (RunStatus::Running, None));
    let worker = start(plain.clone(), true);
    let outcome = within("the worker to finish the run", worker.wait(&id)).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    assert_eq!(server.count("hard1"), 1, "completed steps do not run again");
    assert_eq!(server.count("hard2"), 2, "the step whose result was lost runs again");
    let keys: Vec<_> = server.calls_to("hard2").into_iter().map(|c| c.idempotency_key).collect();
    assert_eq!(keys[0], keys[1]);
    assert_eq!((server.count("hard3"), server.count("hard4")), (1, 1));
    engine.shutdown().await;
    worker.shutdown().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_driver_failed_can_be_resumed_from_another_engine() {
    let server = CounterServer::start().await;
    let dir = temp_dir("resumefail");
    let plain = store(&dir).await;
    let faulty = FaultyStore::new(plain.clone(), false);
    let engine = start(faulty.clone(), false);
    let def = compile_with(&dir, "r.yaml", &chain(&server, "rf", 3, Some(1)));
    let id = engine.submit(&def, json!({})).await.unwrap();
    within("step 1 to be called", server.wait_for_held("rf1")).await;
    faulty.fail_next(usize::MAX / 2);
    server.release("rf1");
    assert!(within("the broken run", engine.wait(&id)).await.is_err());
    let other = start(plain.clone(), false);
    other.resume(&id).await.expect("resume is not refused: nobody holds the run");
    let outcome = within("the resumed run", other.wait(&id)).await.unwrap();
    assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
    engine.shutdown().await;
    other.shutdown().await;
    server.stop().await;
}
