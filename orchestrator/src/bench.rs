//! The benchmark workloads of `shared/bench/WORKLOADS.md` (chain40,
//! fanout100), run in-process against a fresh SQLite database. Trigger =
//! `Engine::submit`; result = the awaited outcome, checked. Prints one JSON
//! object per line.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_observability::Telemetry;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use switchyard_steps::SystemClock;

use crate::compile::{self, Loader};
use crate::engine::{Engine, EngineOptions};
use crate::journal::RunStatus;
use crate::store::{SqliteOptions, SqliteStore};
use crate::workflow::Definition;

const WARMUP: usize = 3;

/// `k`-step chain: step k outputs `{"i": k}` from its input `{"i": k-1}`.
pub fn chain_yaml(k: usize) -> String {
    let mut y = String::from("name: chain40\nsteps:\n");
    for s in 1..=k {
        let from = if s == 1 { "input.i".to_owned() } else { format!("steps.s{}.output.i", s - 1) };
        y.push_str(&format!("  - id: s{s}\n    kind: transform\n"));
        if s > 1 {
            y.push_str(&format!("    needs: [s{}]\n", s - 1));
        }
        y.push_str(&format!("    with: {{i: \"{{{{ {from} + 1 }}}}\"}}\n"));
    }
    y.push_str(&format!("output: \"{{{{ steps.s{k}.output }}}}\"\n"));
    y
}

/// `start`, then `w0..w{n-1}` in parallel, then `join` summing their outputs.
pub fn fanout_yaml(n: usize) -> String {
    let mut y = format!("name: fanout{n}\nsteps:\n  - id: start\n    kind: transform\n    with: {{n: {n}}}\n");
    for j in 0..n {
        y.push_str(&format!("  - id: w{j}\n    kind: transform\n    needs: [start]\n    with: {{v: {j}}}\n"));
    }
    let needs: Vec<String> = (0..n).map(|j| format!("w{j}")).collect();
    let sum: Vec<String> = (0..n).map(|j| format!("steps.w{j}.output.v")).collect();
    y.push_str(&format!(
        "  - id: join\n    kind: transform\n    needs: [{}]\n    with: \"{{{{ {} }}}}\"\noutput: \"{{{{ steps.join.output }}}}\"\n",
        needs.join(", "),
        sum.join(" + ")
    ));
    y
}

struct Text(String);

impl Loader for Text {
    fn load(&self, _key: &str) -> Result<String, String> {
        Ok(self.0.clone())
    }
}

fn compile_text(name: &str, yaml: String, engine: &Engine) -> Result<Definition> {
    compile::compile_from(name, &Text(yaml), engine.registry()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

async fn one(engine: &Engine, def: &Definition, input: Value, expect: &Value) -> Result<()> {
    let outcome = engine.run(def, input).await?;
    if outcome.status != RunStatus::Succeeded || outcome.output.as_ref() != Some(expect) {
        bail!("run {} ended {} with {:?}, expected {expect}", outcome.id, outcome.status, outcome.output);
    }
    Ok(())
}

async fn latency(engine: &Engine, def: &Definition, input: &Value, expect: &Value, n: usize) -> Result<Vec<f64>> {
    for _ in 0..WARMUP {
        one(engine, def, input.clone(), expect).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(engine, def, input.clone(), expect).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

async fn throughput(engine: &Engine, def: &Definition, n: usize) -> Result<Duration> {
    let expect = json!({"i": 40});
    for _ in 0..WARMUP {
        one(engine, def, json!({"i": 0}), &expect).await?;
    }
    burst(engine, def, (0..n).map(|_| (json!({"i": 0}), expect.clone()))).await
}

/// Starts a run of `def` for every `(input, expected result)` at once and
/// waits for all of them: the wall time, or the first failure.
async fn burst(engine: &Engine, def: &Definition, runs: impl Iterator<Item = (Value, Value)>) -> Result<Duration> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (input, expect) in runs {
        let (engine, def) = (engine.clone(), def.clone());
        tasks.spawn(async move { one(&engine, &def, input, &expect).await });
    }
    let mut failed = None;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.context("run task").and_then(|r| r) {
            failed.get_or_insert(e);
        }
    }
    match failed {
        None => Ok(start.elapsed()),
        Some(e) => Err(e),
    }
}

/// Two decimals (three for seconds), for readable JSON.
fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the named workloads (`chain40`, `fanout100`) and prints their JSON lines.
/// With `otlp`, spans and metrics go over OTLP/HTTP to a sink on loopback.
pub async fn run(chosen: &[&str], synchronous_full: bool, otlp: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sink = if otlp { Some(OtlpSink::start().await?) } else { None };
    let telemetry = match &sink {
        Some(sink) => {
            let endpoint = format!("http://{}", sink.addr);
            let t = tokio::task::spawn_blocking(move || {
                // The sink's endpoint; the other `OTEL_*` settings as set.
                Telemetry::from_vars(
                    |k| if k == "OTEL_EXPORTER_OTLP_ENDPOINT" { Some(endpoint.clone()) } else { std::env::var(k).ok() },
                    false,
                )
            })
            .await??;
            Some(t)
        }
        None => None,
    };
    let result = run_in(&dir, chosen, synchronous_full, telemetry.clone()).await;
    if let (Some(t), Some(sink)) = (telemetry, &sink) {
        let flushed = t.clone();
        tokio::task::spawn_blocking(move || flushed.shutdown(Duration::from_secs(10))).await?;
        let (requests, bytes) = sink.received();
        let line = json!({"engine": "switchyard", "workload": "otlp", "metric": "export",
            "spans_exported": t.exported_spans(), "spans_dropped": t.dropped_spans(),
            "requests": requests, "bytes": bytes});
        let _ = writeln!(std::io::stdout(), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A stand-in OTLP/HTTP receiver: answers 200 to every export and counts
/// requests and bytes (no decoding: the benchmark measures the sender).
struct OtlpSink {
    addr: std::net::SocketAddr,
    requests: Arc<std::sync::atomic::AtomicU64>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::task::AbortHandle,
}

impl OtlpSink {
    async fn start() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        let take = move |body: axum::body::Bytes| {
            let (r, b) = (r.clone(), b.clone());
            async move {
                r.fetch_add(1, Ordering::Relaxed);
                b.fetch_add(body.len() as u64, Ordering::Relaxed);
                axum::http::StatusCode::OK
            }
        };
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(take.clone()))
            .route("/v1/metrics", axum::routing::post(take));
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let stop = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
        .abort_handle();
        Ok(Self { addr, requests, bytes, stop })
    }

    fn received(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (self.requests.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.stop.abort();
    }
}

async fn run_in(
    dir: &std::path::Path,
    chosen: &[&str],
    synchronous_full: bool,
    telemetry: Option<Telemetry>,
) -> Result<()> {
    let url = dir.join("bench.db").display().to_string();
    let store = Arc::new(SqliteStore::open(&SqliteOptions { url, synchronous_full }).await?);
    let exporting = telemetry.is_some();
    let options = EngineOptions {
        max_concurrent_runs: 1024,
        telemetry: telemetry.clone().unwrap_or_default(),
        ..Default::default()
    };
    // Each measurement starts with the exporter idle: spans of the one
    // before are exported first (how long that took after chain40's
    // throughput is reported as `drain_ms`).
    let settle = || async {
        let Some(t) = telemetry.clone() else { return Ok(Duration::ZERO) };
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || t.flush(Duration::from_secs(60))).await?;
        Ok::<_, anyhow::Error>(started.elapsed())
    };
    let engine = Engine::start(store, crate::offline_registry(), Arc::new(SystemClock), options);
    let mode = match (synchronous_full, exporting) {
        (true, false) => "sqlite-wal-full",
        (false, false) => "sqlite-wal-normal",
        (true, true) => "sqlite-wal-full+otlp",
        (false, true) => "sqlite-wal-normal+otlp",
    };
    let note = if synchronous_full {
        "in-process trigger; every step's output committed (WAL, synchronous=FULL, fsync) before the next step starts; group commit across runs"
    } else {
        "in-process trigger; every step's output committed (WAL, synchronous=NORMAL: survives process crash, not power loss) before the next step starts"
    };
    let base = json!({"engine": "switchyard", "mode": mode, "per_step_durable": "yes", "notes": note});
    let emit = |mut extra: Value| {
        let mut line = base.clone();
        line.as_object_mut().expect("object").append(extra.as_object_mut().expect("object"));
        // A closed stdout (`bench | head -1`) ends the output, not the process.
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    for w in chosen {
        match *w {
            "chain40" => {
                let def = compile_text("chain40.yaml", chain_yaml(40), &engine)?;
                settle().await?;
                match latency(&engine, &def, &json!({"i": 0}), &json!({"i": 40}), 30).await {
                    Ok(s) => emit(json!({"workload": "chain40", "metric": "latency", "n": 30,
                        "p50_ms": round(percentile(&s, 50.0)), "p95_ms": round(percentile(&s, 95.0))})),
                    Err(e) => {
                        emit(json!({"workload": "chain40", "metric": "latency", "n": 30, "error": e.to_string()}))
                    }
                }
                settle().await?;
                match throughput(&engine, &def, 200).await {
                    Ok(wall) => {
                        let s = wall.as_secs_f64();
                        let mut line = json!({"workload": "chain40", "metric": "throughput", "n": 200,
                            "wall_s": round3(s), "runs_per_s": round(200.0 / s), "steps_per_s": round(8000.0 / s)});
                        if exporting {
                            line["drain_ms"] = json!(round(settle().await?.as_secs_f64() * 1000.0));
                        }
                        emit(line)
                    }
                    Err(e) => {
                        emit(json!({"workload": "chain40", "metric": "throughput", "n": 200, "error": e.to_string()}))
                    }
                }
            }
            "fanout100" => {
                let def = compile_text("fanout100.yaml", fanout_yaml(100), &engine)?;
                settle().await?;
                match latency(&engine, &def, &json!({}), &json!(4950), 20).await {
                    Ok(s) => emit(json!({"workload": "fanout100", "metric": "latency", "n": 20,
                        "p50_ms": round(percentile(&s, 50.0)), "p95_ms": round(percentile(&s, 95.0))})),
                    Err(e) => {
                        emit(json!({"workload": "fanout100", "metric": "latency", "n": 20, "error": e.to_string()}))
                    }
                }
            }
            "parked" => {
                for (kind, n) in [("root", 10_000), ("child", 10_000)] {
                    match parked(&engine, kind, n).await {
                        Ok(bytes) => emit(json!({"workload": "parked", "metric": "memory", "kind": kind, "n": n,
                            "rss_bytes_per_run": bytes.round()})),
                        Err(e) => emit(json!({"workload": "parked", "metric": "memory", "kind": kind, "n": n,
                            "error": e.to_string()})),
                    }
                }
            }
            "signals" => {
                let n = 10_000;
                match signals(&engine, n).await {
                    Ok(mut line) => {
                        line["workload"] = json!("signals");
                        line["metric"] = json!("memory");
                        line["n"] = json!(n);
                        emit(line)
                    }
                    Err(e) => emit(json!({"workload": "signals", "metric": "memory", "n": n, "error": e.to_string()})),
                }
            }
            "llm-router" => {
                for line in llm_router(&engine).await {
                    emit(line);
                }
            }
            other => bail!("unknown workload {other:?}"),
        }
    }
    engine.shutdown().await;
    Ok(())
}

/// Resident memory of this process, from `/proc/self/statm` (Linux).
fn rss_bytes() -> Result<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).context("parsing statm")?;
    Ok(pages * 4096.0)
}

/// Peak resident memory of this process so far (`VmHWM`, Linux).
fn peak_rss_bytes() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("parsing VmHWM")?;
    Ok(kb * 1024.0)
}

/// A `map` of `n` items whose children each wait for a signal: the root
/// parks once every child waits; then every child is signalled and the run
/// completes. Reports the memory held per parked child (the growth of
/// resident memory until the root parked, divided by `n`), the peak, and
/// the times. Switchyard's own measurement, not one of WORKLOADS.md.
async fn signals(engine: &Engine, n: usize) -> Result<Value> {
    let yaml = "name: approvals
steps:
  - id: each
    kind: map
    with:
      items: \"{{ range(input.n) | list }}\"
      concurrency: 50
      steps:
        - {id: gate, kind: wait, with: {signal: go}}
      output: \"{{ steps.gate.output.payload }}\"
output: \"{{ steps.each.output | length }}\"
";
    let def = compile_text("approvals.yaml", yaml.to_owned(), engine)?;
    let before = rss_bytes()?;
    let start = Instant::now();
    let id = engine.submit(&def, json!({"n": n})).await?;
    let parked = engine.wait_settled(&id).await?;
    if parked.status != RunStatus::Waiting || engine.active_runs() != 0 {
        bail!("run {id} did not park: {}", parked.status);
    }
    let park_s = start.elapsed().as_secs_f64();
    let held = rss_bytes()? - before;
    let start = Instant::now();
    for i in 0..n {
        engine.signal(&format!("{id}/each/{i}"), "go", json!(i), Some("bench")).await?;
    }
    let signal_s = start.elapsed().as_secs_f64();
    let done = engine.wait(&id).await?;
    if done.status != RunStatus::Succeeded || done.output != Some(json!(n)) {
        bail!("run {id} ended {} with {:?}", done.status, done.output.or(done.error.map(|e| json!(e.message))));
    }
    Ok(json!({
        "park_all_s": round3(park_s),
        "signal_all_s": round3(signal_s),
        "complete_s": round3(start.elapsed().as_secs_f64()),
        "rss_bytes_per_parked_child": (held / n as f64).round(),
        "peak_rss_mb": round(peak_rss_bytes()? / 1_048_576.0),
        "completed": true,
    }))
}

/// Growth of resident memory per run waiting in a one-hour sleep: `root`
/// runs parked on their own, or `child` runs of one `map` (50 running at
/// once), measured once the map's root has parked too. Switchyard's own
/// measurement, not one of WORKLOADS.md.
async fn parked(engine: &Engine, kind: &str, n: usize) -> Result<f64> {
    let nap = "{id: nap, kind: sleep, with: {duration: 1h}}";
    let def = match kind {
        "root" => compile_text("parked.yaml", format!("name: parked\nsteps: [{nap}]\n"), engine)?,
        _ => compile_text(
            "parked-map.yaml",
            format!(
                "name: parked_map\nsteps:\n  - id: m\n    kind: map\n    with: {{items: \"{{{{ range(input.n) | list }}}}\", concurrency: 50, steps: [{nap}]}}\n"
            ),
            engine,
        )?,
    };
    if kind == "child" {
        // Driving 50 children at once raises the allocator's high-water
        // mark once; a first map pays for it, so the figure below is what
        // parked children keep, not that transient.
        let warm = engine.submit(&def, json!({"n": 1_000})).await?;
        engine.wait_settled(&warm).await?;
    }
    let before = rss_bytes()?;
    let mut ids = Vec::new();
    match kind {
        "root" => {
            for _ in 0..n {
                ids.push(engine.submit(&def, json!({})).await?);
            }
        }
        _ => ids.push(engine.submit(&def, json!({"n": n})).await?),
    }
    for id in &ids {
        let parked = engine.wait_settled(id).await?;
        if parked.status != RunStatus::Waiting {
            bail!("run {id} did not park: {}", parked.status);
        }
    }
    if kind == "child" && engine.parked_children().await? < n + 1_000 {
        bail!("not every child parked");
    }
    Ok((rss_bytes()? - before) / n as f64)
}

/// A chat-completions server on 127.0.0.1 that answers at once (a
/// decision: `refund` if the ticket says so, else `bug`), and two `http`
/// targets; it adds up the time its handlers take.
struct ZeroLatency {
    addr: std::net::SocketAddr,
    handler_ns: Arc<std::sync::atomic::AtomicU64>,
    requests: Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl ZeroLatency {
    async fn start() -> Result<Self> {
        use axum::routing::{any, post};
        use std::sync::atomic::{AtomicU64, Ordering};
        let handler_ns = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (ns, count) = (handler_ns.clone(), requests.clone());
        let chat = move |body: axum::body::Bytes| {
            let (ns, count) = (ns.clone(), count.clone());
            async move {
                let t = Instant::now();
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let text = request["messages"].as_array().and_then(|m| m.last()).map(|m| m["content"].to_string());
                let choice = if text.unwrap_or_default().contains("refund") { "refund" } else { "bug" };
                let content = json!({"choice": choice, "rationale": "benchmark", "confidence": 0.9}).to_string();
                let reply = json!({
                    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
                });
                let out = axum::Json(reply);
                count.fetch_add(1, Ordering::Relaxed);
                ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                out
            }
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/hit/{name}", any(|| async { axum::Json(json!({"ok": true})) }));
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self { addr, handler_ns, requests, stop })
    }

    /// Handler time so far, in ms, and requests so far.
    fn spent(&self) -> (f64, u64) {
        use std::sync::atomic::Ordering;
        (self.handler_ns.load(Ordering::Relaxed) as f64 / 1e6, self.requests.load(Ordering::Relaxed))
    }
}

fn router_yaml(addr: std::net::SocketAddr) -> String {
    format!(
        r#"name: llm_router
steps:
  - id: triage
    kind: decide
    with:
      prompt: "{{{{ input.text }}}}"
      choices: {{refund: Money back., bug: Broken.}}
  - id: refund
    kind: http
    needs: [triage.refund]
    with: {{method: POST, url: "http://{addr}/hit/refund", json: {{t: "{{{{ input.text }}}}"}}}}
  - id: bug
    kind: http
    needs: [triage.bug]
    with: {{method: POST, url: "http://{addr}/hit/bug", json: {{t: "{{{{ input.text }}}}"}}}}
output: "{{{{ steps.triage.output.choice }}}}"
"#
    )
}

/// `llm-router`: 200 runs one after another (latency, and the model server's
/// own time per run), then 2,000 runs at once of the router, of a decide
/// alone and (for scale) of a one-step transform, then 20 runs at once of
/// 100 decide steps side by side (decide steps per second without a run
/// each),
/// with the provider `default` on a zero-latency local server and no
/// provider limit. The overhead per LLM step is the p50 run latency minus
/// the p50 latency of the same workflow with a `switch` in place of the
/// `decide` (same paths, same `http` step, same commits) minus the model
/// server's own time per call: what the model step adds besides the model.
async fn llm_router(base: &Engine) -> Vec<Value> {
    match llm_router_inner(base).await {
        Ok(lines) => lines,
        Err(e) => vec![json!({"workload": "llm-router", "metric": "latency", "n": 200, "error": e.to_string()})],
    }
}

async fn llm_router_inner(base: &Engine) -> Result<Vec<Value>> {
    use switchyard_integrations::llm::{ApiKey, Limits, ProviderConfig, Providers};
    let server = ZeroLatency::start().await?;
    let http = switchyard_integrations::http::ReqwestHttp::new().map_err(|e| anyhow::anyhow!("{e}"))?;
    let provider = ProviderConfig {
        name: "default".into(),
        base_url: format!("http://{}/v1", server.addr),
        api_key: ApiKey::new("sk-bench").map_err(anyhow::Error::msg)?,
        default_model: "bench".into(),
        limits: Limits::default(),
        system: "openai".to_owned(),
    };
    let models = Providers::new(http.client(), vec![provider]);
    let registry = crate::registry(Arc::new(http), Arc::new(models));
    let max_runs = std::env::var("BENCH_MAX_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let options = EngineOptions { max_concurrent_runs: max_runs, ..Default::default() };
    let engine = Engine::start(base.store().clone(), registry, Arc::new(SystemClock), options);
    let def = compile_text("llm-router.yaml", router_yaml(server.addr), &engine)?;
    let switch = router_yaml(server.addr).replacen(
        "kind: decide\n    with:\n      prompt: \"{{ input.text }}\"\n      choices: {refund: Money back., bug: Broken.}",
        "kind: switch\n    with:\n      cases: [{when: \"'refund' in input.text\", path: refund}]\n      default: bug",
        1,
    );
    let switch = switch.replace("steps.triage.output.choice", "steps.triage.output.path");
    let plain = compile_text("switch-router.yaml", switch, &engine)?;
    let input = json!({"text": "please refund me"});
    let expect = json!("refund");

    // The two workflows alternate, so that drift in the machine's speed
    // touches both alike.
    for _ in 0..WARMUP {
        one(&engine, &plain, input.clone(), &expect).await?;
        one(&engine, &def, input.clone(), &expect).await?;
    }
    let n = 200;
    let (mut baseline, mut samples) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (before_ms, before_n) = server.spent();
    for _ in 0..n {
        let t = Instant::now();
        one(&engine, &plain, input.clone(), &expect).await?;
        baseline.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        one(&engine, &def, input.clone(), &expect).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (after_ms, after_n) = server.spent();
    baseline.sort_by(f64::total_cmp);
    samples.sort_by(f64::total_cmp);
    let server_ms = (after_ms - before_ms) / (after_n - before_n).max(1) as f64;
    let p50 = percentile(&samples, 50.0);
    let overhead = p50 - percentile(&baseline, 50.0) - server_ms;
    let mut lines = vec![json!({
        "workload": "llm-router", "metric": "latency", "n": n,
        "p50_ms": round(p50), "p95_ms": round(percentile(&samples, 95.0)),
        "switch_p50_ms": round(percentile(&baseline, 50.0)),
        "model_server_ms_per_call": round3(server_ms),
        "overhead_per_llm_step_ms": round3(overhead),
    })];

    // The router (decide, then an http step), and a decide alone.
    let alone = router_yaml(server.addr);
    let alone = alone.split("  - id: refund").next().unwrap_or_default().to_owned()
        + "output: \"{{ steps.triage.output.choice }}\"\n";
    let alone = compile_text("decide.yaml", alone, &engine)?;
    // The engine alone, for scale: a one-step run whose step answers the same.
    let bare = "name: bare\nsteps:\n  - id: triage\n    kind: transform\n    with: {choice: \"{{ 'refund' if 'refund' in input.text else 'bug' }}\"}\noutput: \"{{ steps.triage.output.choice }}\"\n";
    let bare = compile_text("bare.yaml", bare.to_owned(), &engine)?;
    for (what, def) in [("router", &def), ("decide_only", &alone), ("transform_only", &bare)] {
        let n = 2_000;
        let runs = (0..n).map(|i| {
            let (text, expect) = if i % 2 == 0 { ("refund me", "refund") } else { ("it crashes", "bug") };
            (json!({"text": text}), json!(expect))
        });
        lines.push(match burst(&engine, def, runs).await {
            Ok(wall) => {
                let wall = wall.as_secs_f64();
                let mut line = json!({"workload": "llm-router", "metric": "throughput", "workflow": what, "n": n,
                    "wall_s": round3(wall), "runs_per_s": round(n as f64 / wall)});
                if what != "transform_only" {
                    line["decide_steps_per_s"] = json!(round(n as f64 / wall));
                }
                line
            }
            Err(e) => {
                json!({"workload": "llm-router", "metric": "throughput", "workflow": what, "n": n, "error": e.to_string()})
            }
        });
    }
    // Decide steps without a run each: 20 runs at once, each with 100
    // decide steps side by side (like fanout100), then a join.
    let mut wide = String::from("name: decide_fanout\nsteps:\n");
    for j in 0..100 {
        wide.push_str(&format!(
            "  - {{id: d{j}, kind: decide, with: {{prompt: \"{{{{ input.text }}}} {j}\", choices: {{refund: Money back., bug: Broken.}}}}}}\n"
        ));
    }
    let needs: Vec<String> = (0..100).map(|j| format!("d{j}")).collect();
    wide.push_str(&format!(
        "  - {{id: join, kind: transform, needs: [{}], with: {{n: 100}}}}\noutput: \"{{{{ steps.d0.output.choice }}}}\"\n",
        needs.join(", ")
    ));
    let wide = compile_text("decide-fanout.yaml", wide, &engine)?;
    let runs = (0..20).map(|_| (json!({"text": "refund me"}), json!("refund")));
    lines.push(match burst(&engine, &wide, runs).await.map(|wall| wall.as_secs_f64()) {
        Ok(wall) => json!({"workload": "llm-router", "metric": "throughput", "workflow": "decide_fanout", "n": 20,
            "decide_steps": 2000, "wall_s": round3(wall), "decide_steps_per_s": round(2000.0 / wall)}),
        Err(e) => json!({"workload": "llm-router", "metric": "throughput", "workflow": "decide_fanout", "n": 20,
            "error": e.to_string()}),
    });
    engine.shutdown().await;
    let _ = server.stop.send(());
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 15.0);
        assert_eq!(percentile(&s, 95.0), 29.0);
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 10.0);
    }
}
