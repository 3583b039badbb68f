//! The `switchyard` command line.

use axum::response::IntoResponse as _;
use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use switchyard_observability::{SpanContext, Telemetry};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use switchyard_steps::{Registry, SystemClock};

use crate::engine::{Cancelled, CommitError, Engine, EngineOptions, Error as EngineError, RunOutcome, Submitted};
use crate::journal::{Event, RunStatus};
use crate::report::{printable, printable_lines};
use crate::store::{self, Signalled, SqliteOptions, SqliteStore, Store};
use crate::{compile, files, report};

/// Exit code for invalid workflows, inputs and usage.
const EXIT_INVALID: u8 = 2;

// Output. `println!` and `eprintln!` panic when a write fails, as it does
// once the reader of a pipe is gone (`switchyard runs list | head -1`);
// these never do. Run data in the text goes through `report::printable`.

/// `println!` that returns the write error instead: `outln!(...)?`. A
/// closed stdout is [`StdoutClosed`], which ends the command successfully.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` that ignores a failed write: there is nowhere left to say so.
macro_rules! errln {
    ($($arg:tt)*) => { write_stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Appends a line to a `String` (which cannot fail).
macro_rules! put {
    ($buf:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($buf, $($arg)*);
    }};
}

mod vault;

/// Stdout was closed by its reader: the command stops printing and, having
/// nothing left to tell, exits 0.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
struct StdoutClosed;

fn write_stdout(args: fmt::Arguments<'_>) -> Result<()> {
    let mut out = io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}

fn write_stderr(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// For output that is not all the command has to do (a run's result, the
/// `validate` lines): a closed stdout is not an error there.
fn unless_closed(written: Result<()>) -> Result<()> {
    match written {
        Err(e) if e.is::<StdoutClosed>() => Ok(()),
        other => other,
    }
}

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Durable AI workflow orchestration")]
pub struct Cli {
    /// Database: a SQLite file path or sqlite:// URL.
    #[arg(long, global = true, env = "SWITCHYARD_DATABASE_URL", default_value = "switchyard.db")]
    db: String,
    /// SQLite sync mode: `full` (durable across power loss) or `normal`
    /// (durable across process crashes).
    #[arg(long, global = true, env = "SWITCHYARD_SQLITE_SYNC", value_enum, default_value = "full")]
    sqlite_sync: SqliteSync,
    /// How long a process's claim on a run lasts without renewal.
    #[arg(long, global = true, env = "SWITCHYARD_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Root runs executing at once in this process.
    #[arg(long, global = true, env = "SWITCHYARD_MAX_RUNS", default_value_t = 256)]
    max_runs: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SqliteSync {
    Full,
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    All,
    Chain40,
    Fanout100,
    /// Memory per parked run (root and map child); not part of `all`.
    Parked,
    /// A map of 10,000 children waiting for signals: memory, then signal
    /// them all; not part of `all`.
    Signals,
    /// A `decide` against a zero-latency local model server, then one of
    /// two `http` steps: Switchyard's overhead per LLM step, and decide
    /// steps per second; not part of `all`.
    LlmRouter,
}

fn parse_status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s).ok_or_else(|| "use queued, running, waiting, succeeded, failed or cancelled".to_owned())
}

fn parse_traceparent(s: &str) -> Result<SpanContext, String> {
    SpanContext::parse(s)
}

/// The process's telemetry, set once in `main` (from the `OTEL_*`
/// variables) before the runtime starts.
static TELEMETRY: std::sync::OnceLock<Telemetry> = std::sync::OnceLock::new();

fn telemetry() -> Telemetry {
    TELEMETRY.get().cloned().unwrap_or_default()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    switchyard_steps::duration::parse(s)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check workflow files; prints every error with its place.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a workflow to its end; the result goes to stdout.
    Run {
        file: PathBuf,
        /// Run input: JSON text, or @path to a JSON file.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Start the run only once per key: running the command again with
        /// the same key reports the first run instead of starting another.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The caller's W3C trace context (`00-<trace id>-<span id>-<flags>`):
        /// the run's trace hangs under that span.
        #[arg(long, value_parser = parse_traceparent)]
        traceparent: Option<SpanContext>,
    },
    /// Inspect and steer runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Send a signal to a run (root or child) whose step waits for it
    /// (`kind: wait`); the process holding the run, or a worker, goes on.
    Signal {
        run: String,
        name: String,
        /// The signal's payload: JSON text, or @path to a JSON file.
        #[arg(long, default_value = "null")]
        data: String,
    },
    /// Run queued, unfinished and waking runs from the database.
    Worker {
        /// Exit once no unfinished run is left.
        #[arg(long)]
        exit_when_idle: bool,
        /// Serve metrics as Prometheus text at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// The credential vault's master key: init, rotate.
    Vault {
        #[command(subcommand)]
        command: vault::VaultCommand,
    },
    /// Connections: named credentials, sealed in the vault.
    Connections {
        #[command(subcommand)]
        command: vault::ConnectionsCommand,
    },
    /// Run the benchmark workloads (chain40, fanout100); prints JSON lines.
    Bench {
        #[arg(long, value_enum, default_value = "all")]
        workload: Workload,
        /// Export spans and metrics over OTLP/HTTP to a receiver the
        /// benchmark starts on loopback (it takes and counts the requests).
        #[arg(long)]
        otlp: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// Recent root runs, newest first.
    List {
        #[arg(long, value_parser = parse_status)]
        status: Option<RunStatus>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A run's status, result and steps.
    Show {
        run: String,
        /// Print the raw journal too.
        #[arg(long)]
        journal: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Continue a failed (or abandoned) run; completed steps are not repeated.
    Resume { run: String },
    /// Start a new run with a finished run's input, running STEP and every
    /// step after it again; unchanged steps before it are reused, not run.
    Rerun {
        run: String,
        /// The first step to run again.
        #[arg(long = "from", value_name = "STEP")]
        from: String,
        /// An edited workflow file to run instead of the one RUN ran.
        #[arg(long, value_name = "WORKFLOW")]
        file: Option<PathBuf>,
    },
    /// Cancel a run.
    Cancel { run: String },
}

/// Who is acting, for the journal: `cli:<login name>`.
fn actor() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default();
    let user: String = user.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).take(64).collect();
    if user.is_empty() { "cli".to_owned() } else { format!("cli:{user}") }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = switchyard_observability::init() {
        errln!("error: {e}");
        return ExitCode::from(EXIT_INVALID);
    }
    switchyard_integrations::install_crypto_provider();
    // Only commands that drive runs report telemetry: the others (validate,
    // runs list/show, signal, bench) start no exporter.
    let runs_work = matches!(
        cli.command,
        Command::Run { .. }
            | Command::Worker { .. }
            | Command::Runs {
                command: RunsCommand::Resume { .. } | RunsCommand::Rerun { .. } | RunsCommand::Cancel { .. }
            }
    );
    if runs_work {
        let prometheus = matches!(cli.command, Command::Worker { metrics_listen: Some(_), .. });
        match Telemetry::from_env(prometheus) {
            Ok(t) => {
                let _ = TELEMETRY.set(t);
            }
            Err(e) => {
                errln!("error: {}", printable_lines(&e.to_string()));
                return ExitCode::from(EXIT_INVALID);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let db = cli.db.clone();
    let result = runtime.block_on(execute(cli));
    // Outside the runtime: the exporters' blocking clients need it so.
    // Spans still queued get a few seconds to reach the receiver.
    drop(runtime);
    telemetry().shutdown(Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        // A bad setting is bad usage: exit 2, like a bad flag.
        Err(e) if e.is::<ConfigError>() => {
            errln!("error: {}", printable_lines(&e.to_string()));
            ExitCode::from(EXIT_INVALID)
        }
        Err(e) => {
            errln!("error: {}", printable_lines(&describe(&db, &e)));
            ExitCode::FAILURE
        }
    }
}

/// The message of a failed command. One that comes from the database names
/// it, once: `database <db>: <what went wrong>`.
fn describe(db: &str, e: &anyhow::Error) -> String {
    match e.chain().find_map(database_cause) {
        Some(cause) => format!("database {db}: {cause}"),
        None => format!("{e:#}"),
    }
}

/// What went wrong in the database, without the layers that only say
/// "database" again.
fn database_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    fn store_cause(e: &store::Error) -> String {
        match e {
            store::Error::Db(e) => sqlx_cause(e),
            other => other.to_string(),
        }
    }
    fn sqlx_cause(e: &sqlx::Error) -> String {
        match e {
            sqlx::Error::Database(e) => e.message().to_owned(),
            other => other.to_string(),
        }
    }
    if let Some(e) = e.downcast_ref::<EngineError>() {
        return match e {
            EngineError::Store(e) => Some(store_cause(e)),
            // The message is a store error's text; its "database: " says
            // what the prefix says already.
            EngineError::Commit(CommitError::Failed(m)) => {
                Some(format!("journal write failed: {}", m.strip_prefix("database: ").unwrap_or(m)))
            }
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<store::Error>() {
        return Some(store_cause(e));
    }
    e.downcast_ref::<sqlx::Error>().map(sqlx_cause)
}

/// `--db` must name a database file. An empty name and in-memory SQLite are
/// refused before anything is opened: the store keeps a pool of
/// connections, and each would get its own empty in-memory database.
fn check_db(db: &str) -> Result<(), String> {
    let lower = db.trim().to_ascii_lowercase();
    let path = lower.strip_prefix("sqlite://").or_else(|| lower.strip_prefix("sqlite:")).unwrap_or(&lower);
    if path.split('?').next().unwrap_or_default().trim().is_empty() {
        return Err(format!("--db \"{}\": no database file named; give a file path or sqlite:// URL", printable(db)));
    }
    if lower.contains(":memory:") || lower.contains("mode=memory") {
        return Err(format!(
            "--db \"{}\": in-memory databases are not supported (each connection would see its own empty database); \
             give a file path",
            printable(db)
        ));
    }
    Ok(())
}

/// A setting (an environment variable) that cannot be used; the message
/// names it, never its value when that may be a secret.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

fn registry() -> Result<Registry> {
    use switchyard_integrations::llm::{ProviderConfig, Providers};
    let http = switchyard_integrations::http::ReqwestHttp::new().context("HTTP client")?;
    // The provider `default`, from the environment, until the vault holds
    // connections.
    let default = ProviderConfig::from_env(|name| std::env::var(name).ok()).map_err(ConfigError)?;
    let models = Providers::new(http.client(), vec![default]);
    Ok(crate::registry(Arc::new(http), Arc::new(models)))
}

async fn open_store(cli: &Cli) -> Result<Arc<dyn Store>> {
    let synchronous_full = cli.sqlite_sync == SqliteSync::Full;
    // `describe` names the database in the message.
    let store = SqliteStore::open(&SqliteOptions { url: cli.db.clone(), synchronous_full }).await?;
    Ok(Arc::new(store))
}

fn engine(cli: &Cli, store: Arc<dyn Store>, registry: Registry, worker: bool) -> Engine {
    let telemetry = telemetry();
    // A bad price table is reported by `runs show`; the cost metric then
    // stays empty.
    let prices = match (telemetry.metrics(), std::env::var("SWITCHYARD_LLM_PRICES")) {
        (Some(_), Ok(text)) => report::Prices::parse(&text).unwrap_or_default(),
        _ => report::Prices::default(),
    };
    let options = EngineOptions {
        max_concurrent_runs: cli.max_runs,
        lease: cli.lease,
        worker,
        telemetry,
        prices: Arc::new(prices),
        ..Default::default()
    };
    Engine::start(store, registry, Arc::new(SystemClock), options)
}

async fn execute(cli: Cli) -> Result<ExitCode> {
    let opens_db = matches!(
        cli.command,
        Command::Run { .. } | Command::Runs { .. } | Command::Worker { .. } | Command::Signal { .. }
    );
    if opens_db && let Err(e) = check_db(&cli.db) {
        errln!("error: {e}");
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    match &cli.command {
        Command::Validate { files } => {
            let registry = registry()?;
            let mut failed = false;
            for file in files {
                match compile::compile_file(file, &registry) {
                    Ok(def) => unless_closed(outln!(
                        "{}: ok ({} steps)",
                        printable(&file.display().to_string()),
                        def.workflow.step_ids().count()
                    ))?,
                    Err(errors) => {
                        failed = true;
                        for e in &errors.0 {
                            errln!("{}", printable_lines(&located(file, e)));
                        }
                    }
                }
            }
            Ok(if failed { ExitCode::from(EXIT_INVALID) } else { ExitCode::SUCCESS })
        }
        Command::Run { file, input, idempotency_key, traceparent } => {
            let registry = registry()?;
            let def = match compile::compile_file(file, &registry) {
                Ok(def) => def,
                Err(errors) => {
                    for e in &errors.0 {
                        errln!("{}", printable_lines(&located(file, e)));
                    }
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let input = match read_input(input) {
                Ok(v) => v,
                Err(e) => {
                    errln!("error: --input: {}", printable_lines(&format!("{e:#}")));
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let store = open_store(&cli).await?;
            let engine = engine(&cli, store, registry, false);
            let submitted = engine.submit_traced(&def, input, idempotency_key.as_deref(), traceparent.as_ref()).await;
            let id = match submitted {
                Ok(Submitted { id, created: true }) => {
                    errln!("run {id} started ({} v{})", printable(def.workflow.name()), def.workflow.version());
                    id
                }
                Ok(Submitted { id, created: false }) => {
                    errln!("run {id} already exists for this idempotency key");
                    // Continue it here if nobody drives it (its process died,
                    // once that process's lease has expired); a live run is
                    // waited for, a finished one only reported.
                    // Said once: a live holder renews its lease as it goes.
                    let mut told = false;
                    engine
                        .take_over(&id, |until| {
                            if !std::mem::replace(&mut told, true) {
                                errln!(
                                    "waiting for the lease of the process that holds run {id} (until {})",
                                    report::format_ms(until)
                                );
                            }
                        })
                        .await?;
                    id
                }
                Err(EngineError::InvalidInput(errors)) => {
                    for e in errors {
                        errln!("{}: {}", file.display(), printable(&e));
                    }
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e @ EngineError::Conflict(_)) => {
                    errln!("error: {}", printable_lines(&e.to_string()));
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            };
            wait_and_report(&engine, &id).await
        }
        Command::Runs { command } => {
            let store = open_store(&cli).await?;
            runs(&cli, store, command).await
        }
        Command::Signal { run, name, data } => {
            let payload = match read_input(data) {
                Ok(v) => v,
                Err(e) => {
                    errln!("error: --data: {}", printable_lines(&format!("{e:#}")));
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let store = open_store(&cli).await?;
            let engine = engine(&cli, store, registry()?, false);
            let result = engine.signal(run, name, payload, Some(&actor())).await;
            engine.shutdown().await;
            let (run, name) = (printable(run), printable(name));
            let refused = |why: String| {
                errln!("error: {why}");
                Ok(ExitCode::from(EXIT_INVALID))
            };
            match result {
                Ok(Signalled::Delivered { waiting: true, .. }) => {
                    outln!("signal {name} sent to run {run}; the process holding it, or a worker, goes on")?;
                    Ok(ExitCode::SUCCESS)
                }
                Ok(Signalled::Delivered { waiting: false, .. }) => {
                    outln!("signal {name} sent to run {run}; no step waits for it yet: the first that does gets it")?;
                    Ok(ExitCode::SUCCESS)
                }
                Ok(Signalled::Duplicate) => refused(format!("run {run} already received signal {name}")),
                Ok(Signalled::NotWaiting) => refused(format!("run {run} no longer waits for signal {name}")),
                Ok(Signalled::Finished(status)) => refused(format!("run {run} is already {status}")),
                Err(e @ (EngineError::NotFound(_) | EngineError::InvalidInput(_))) => {
                    refused(printable_lines(&e.to_string()).into_owned())
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Worker { exit_when_idle, metrics_listen } => {
            let store = open_store(&cli).await?;
            let engine = engine(&cli, store, registry()?, true);
            let _metrics = match metrics_listen {
                Some(addr) => Some(serve_metrics(*addr).await?),
                None => None,
            };
            errln!("worker started (database {})", printable(&cli.db));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        errln!("stopping: leases released, unfinished runs continue in the next worker");
                        engine.shutdown().await;
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)), if *exit_when_idle => {
                        if engine.is_idle().await? {
                            engine.shutdown().await;
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                }
            }
        }
        Command::Vault { command } => vault::vault(&cli.db, command).await,
        Command::Connections { command } => vault::connections(&cli.db, command).await,
        Command::Bench { workload, otlp } => {
            let chosen: &[&str] = match workload {
                Workload::All => &["chain40", "fanout100"],
                Workload::Chain40 => &["chain40"],
                Workload::Fanout100 => &["fanout100"],
                Workload::Parked => &["parked"],
                Workload::Signals => &["signals"],
                Workload::LlmRouter => &["llm-router"],
            };
            crate::bench::run(chosen, cli.sqlite_sync == SqliteSync::Full, *otlp).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Serves `GET /metrics` (Prometheus text) on `addr` until the returned
/// guard is dropped.
async fn serve_metrics(addr: std::net::SocketAddr) -> Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen {addr}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            match telemetry().metrics().and_then(|m| m.prometheus_text()) {
                Some(text) => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                    .into_response(),
                None => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    errln!("metrics at http://{local}/metrics");
    Ok(MetricsServer(task))
}

/// Child runs `runs show` shows in full; the rest are listed by id and status.
const SHOWN_CHILDREN: usize = 50;

/// Stops the metrics endpoint when dropped.
struct MetricsServer(tokio::task::JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn located(file: &std::path::Path, e: &compile::CompileError) -> String {
    // Errors in the file itself are named by the path the user gave.
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if e.file == name {
        compile::CompileError { file: file.display().to_string(), ..e.clone() }.to_string()
    } else {
        e.to_string()
    }
}

/// `--input`: JSON text, or `@path` to a JSON file (a regular file under
/// the size limit). A leading byte-order mark is dropped from either.
fn read_input(text: &str) -> Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => files::read_text(Path::new(path), files::MAX_FILE_BYTES).map_err(anyhow::Error::msg)?,
        None => files::strip_bom(text.to_owned()),
    };
    serde_json::from_str(&text).context("not valid JSON")
}

/// Waits for a run, prints its result to stdout and its steps to stderr.
async fn wait_and_report(engine: &Engine, id: &str) -> Result<ExitCode> {
    let outcome = tokio::select! {
        r = engine.wait(id) => r?,
        _ = tokio::signal::ctrl_c() => {
            engine.shutdown().await;
            errln!("interrupted; the run is kept. Continue it with: switchyard runs resume {}", printable(id));
            return Ok(ExitCode::from(130));
        }
    };
    print_steps(engine.store(), id).await?;
    print_outcome(&outcome)
}

async fn print_steps(store: &Arc<dyn Store>, id: &str) -> Result<()> {
    let journal = store.journal(id).await?;
    write_stderr(format_args!("{}", report::render(&report::steps(&journal))));
    Ok(())
}

fn print_outcome(outcome: &RunOutcome) -> Result<ExitCode> {
    let id = printable(&outcome.id);
    match outcome.status {
        RunStatus::Succeeded => {
            let output = outcome.output.as_ref().unwrap_or(&Value::Null);
            // The run is over: a reader that left does not change that.
            unless_closed(outln!("{}", report::json_pretty(output)?))?;
            errln!("run {id} succeeded");
            Ok(ExitCode::SUCCESS)
        }
        status => {
            let why = outcome
                .error
                .as_ref()
                .map(|e| format!(": {}: {}", printable(&e.code), printable(&e.message)))
                .unwrap_or_default();
            errln!("run {id} {status}{why}");
            if status == RunStatus::Failed {
                errln!("resume it with: switchyard runs resume {id}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn runs(cli: &Cli, store: Arc<dyn Store>, command: &RunsCommand) -> Result<ExitCode> {
    match command {
        RunsCommand::List { status, limit, json } => {
            let runs = store.runs(*status, false, *limit).await?;
            if *json {
                let items: Vec<report::RunListItem<'_>> = runs.iter().map(Into::into).collect();
                outln!("{}", report::json_pretty(&items)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut text = String::new();
            put!(text, "{:<36}  {:<24}  {:<10}  CREATED", "RUN", "WORKFLOW", "STATUS");
            for r in &runs {
                let (id, workflow) = (printable(&r.id), printable(&r.workflow));
                put!(text, "{id:<36}  {workflow:<24}  {:<10}  {}", r.status.as_str(), report::format_ms(r.created_at));
            }
            write_stdout(format_args!("{text}"))?;
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Show { run, journal, json } => {
            let Some(r) = store.run(run).await? else {
                errln!("error: no run \"{}\"", printable(run));
                return Ok(ExitCode::from(EXIT_INVALID));
            };
            let entries = store.journal(run).await?;
            let mut steps = report::steps(&entries);
            if let Ok(text) = std::env::var("SWITCHYARD_LLM_PRICES") {
                report::Prices::parse(&text).map_err(ConfigError)?.apply(&mut steps);
            }
            let children = store.children(run).await?;
            // The first children are shown in full, with their steps.
            let mut shown = Vec::new();
            for c in children.iter().take(SHOWN_CHILDREN) {
                let j = store.journal(&c.id).await?;
                shown.push(report::ChildTimeline::new(&r.id, c.clone(), &j));
            }
            let trace_id = if r.parent_id.is_none() {
                crate::engine::trace_id(&r.id, entries.first().map(|e| &e.event))
            } else {
                let root = store.journal(&r.root_id).await?;
                crate::engine::trace_id(&r.root_id, root.first().map(|e| &e.event))
            };
            if *json {
                let detail =
                    report::run_detail(&r, &steps, &children, &shown, journal.then_some(&entries[..]), trace_id);
                outln!("{}", report::json_pretty(&detail)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut text = String::new();
            put!(text, "run:      {}", printable(&r.id));
            if let Some(parent) = &r.parent_id {
                put!(text, "parent:   {}", printable(parent));
            }
            put!(text, "workflow: {} v{}", printable(&r.workflow), r.version);
            put!(text, "status:   {}", r.status);
            put!(text, "trace:    {trace_id}");
            put!(text, "created:  {}", report::format_ms(r.created_at));
            match r.wake_at {
                Some(at) if r.status == RunStatus::Waiting => put!(text, "wakes:    {}", report::format_ms(at)),
                None if r.status == RunStatus::Waiting => {
                    put!(text, "wakes:    on a signal (`switchyard signal {} <name>`)", printable(&r.id))
                }
                _ => {}
            }
            put!(text, "input:    {}", report::json(&r.input)?);
            if let Some(out) = &r.output {
                put!(text, "output:   {}", report::json(out)?);
            }
            if let Some(e) = &r.error {
                put!(text, "error:    {}: {}", printable(&e.code), printable(&e.message));
            }
            let end = entries.last().map_or(r.updated_at, |e| e.at).max(r.finished_at.unwrap_or(0));
            put!(text, "timeline: from {} ({} ms)", report::format_ms(r.created_at), (end - r.created_at).max(0));
            text.push_str(&report::render_timeline(&steps, r.created_at, end, &shown));
            if children.len() > shown.len() {
                put!(text, "child runs: {} ({} shown)", children.len(), shown.len());
            } else if !children.is_empty() {
                put!(text, "child runs: {}", children.len());
            }
            if *journal {
                put!(text, "journal:");
                for e in &entries {
                    put!(text, "  {:>4} {} {}", e.seq, report::format_ms(e.at), report::json(&e.event)?);
                }
            }
            write_stdout(format_args!("{text}"))?;
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Resume { run } => {
            let engine = engine(cli, store, registry()?, false);
            match engine.resume_as(run, Some(&actor())).await {
                Ok(()) => {}
                Err(e @ (EngineError::NotFound(_) | EngineError::Conflict(_))) => {
                    errln!("error: {}", printable_lines(&e.to_string()));
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            }
            errln!("run {} resumed", printable(run));
            wait_and_report(&engine, run).await
        }
        RunsCommand::Rerun { run, from, file } => rerun(cli, store, run, from, file.as_deref()).await,
        RunsCommand::Cancel { run } => {
            let engine = engine(cli, store, registry()?, false);
            let result = match engine.cancel_as(run, Some(&actor())).await {
                Ok(r) => r,
                Err(e @ (EngineError::NotFound(_) | EngineError::Conflict(_))) => {
                    errln!("error: {}", printable_lines(&e.to_string()));
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            };
            engine.shutdown().await;
            match result {
                Cancelled::Done => outln!("run {} cancelled", printable(run))?,
                Cancelled::Requested { lease_until } => {
                    let until = lease_until.map(|t| format!(" (its lease runs until {})", report::format_ms(t)));
                    outln!(
                        "cancellation of run {} requested: the process holding it{} stops it, or, if that process \
                         has died, the run ends cancelled when a worker or `runs resume` takes it over",
                        printable(run),
                        until.unwrap_or_default()
                    )?
                }
                Cancelled::AlreadyFinished(status) => outln!("run {} already {status}", printable(run))?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `runs rerun`: says which steps are reused, then waits and reports like `run`.
async fn rerun(cli: &Cli, store: Arc<dyn Store>, run: &str, from: &str, file: Option<&Path>) -> Result<ExitCode> {
    let registry = registry()?;
    let def = match file {
        None => None,
        Some(file) => match compile::compile_file(file, &registry) {
            Ok(def) => Some(def),
            Err(errors) => {
                for e in &errors.0 {
                    errln!("{}", printable_lines(&located(file, e)));
                }
                return Ok(ExitCode::from(EXIT_INVALID));
            }
        },
    };
    let engine = engine(cli, store, registry, false);
    let id = match engine.rerun(run, from, def.as_ref()).await {
        Ok(id) => id,
        Err(e @ (EngineError::NotFound(_) | EngineError::Conflict(_))) => {
            errln!("error: {}", printable_lines(&e.to_string()));
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(EngineError::InvalidInput(errors)) => {
            for e in errors {
                errln!("error: {}", printable(&e));
            }
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    // The new run's first events: `run_started`, then one `step_reused` per
    // reused step, committed together.
    let journal = engine.store().journal(&id).await?;
    let reused: Vec<String> = journal
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepReused { step, .. } => Some(printable(step).into_owned()),
            _ => None,
        })
        .collect();
    let run = printable(run);
    if reused.is_empty() {
        errln!("reusing no step from {run}");
    } else {
        errln!("reusing {} from {run}", reused.join(", "));
    }
    if let Some(Event::RunStarted { workflow, version, .. }) = journal.first().map(|e| &e.event) {
        errln!("run {id} started ({} v{version}), from step {}", printable(workflow), printable(from));
    }
    wait_and_report(&engine, &id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_name_the_database_once() {
        let db_error = |e: EngineError| describe("/var/sy.db", &anyhow::Error::from(e));
        assert_eq!(
            db_error(EngineError::Store(store::Error::Db(sqlx::Error::PoolTimedOut))),
            "database /var/sy.db: pool timed out while waiting for an open connection"
        );
        assert_eq!(
            db_error(EngineError::Commit(CommitError::Failed("database: disk I/O error".into()))),
            "database /var/sy.db: journal write failed: disk I/O error"
        );
        let store_error = anyhow::Error::from(store::Error::Corrupt("runs.input: bad JSON".into())).context("show");
        assert_eq!(describe("x.db", &store_error), "database x.db: stored data is invalid: runs.input: bad JSON");
        let other = anyhow::Error::from(EngineError::NotFound("r1".into()));
        assert_eq!(describe("x.db", &other), "no run \"r1\"");
    }

    #[test]
    fn empty_and_in_memory_databases_are_refused() {
        for db in
            ["", " ", "sqlite:", "sqlite://", "sqlite://?mode=rwc", ":memory:", "sqlite::memory:", "file::memory:"]
        {
            assert!(check_db(db).is_err(), "{db:?}");
        }
        assert!(check_db("sqlite://a.db?mode=memory&cache=shared").unwrap_err().contains("in-memory"));
        for db in ["switchyard.db", "/tmp/x/sy.db", "sqlite://sy.db", "sqlite:///abs/sy.db?mode=rwc"] {
            assert!(check_db(db).is_ok(), "{db:?}");
        }
    }
}
