//! The `switchyard` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use switchyard_steps::{Registry, SystemClock};

use crate::engine::{Cancelled, Engine, EngineOptions, Error as EngineError, RunOutcome, Submitted};
use crate::journal::RunStatus;
use crate::store::{SqliteOptions, SqliteStore, Store};
use crate::{compile, report};

/// Exit code for invalid workflows, inputs and usage.
const EXIT_INVALID: u8 = 2;

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
}

fn parse_status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s).ok_or_else(|| "use queued, running, waiting, succeeded, failed or cancelled".to_owned())
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
    },
    /// Inspect and steer runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Run queued, unfinished and waking runs from the database.
    Worker {
        /// Exit once no unfinished run is left.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Run the benchmark workloads (chain40, fanout100); prints JSON lines.
    Bench {
        #[arg(long, value_enum, default_value = "all")]
        workload: Workload,
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
    },
    /// A run's status, result and steps.
    Show {
        run: String,
        /// Print the raw journal too.
        #[arg(long)]
        journal: bool,
    },
    /// Continue a failed (or abandoned) run; completed steps are not repeated.
    Resume { run: String },
    /// Cancel a run.
    Cancel { run: String },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard_observability::init();
    switchyard_integrations::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn registry() -> Result<Registry> {
    let http = switchyard_integrations::http::ReqwestHttp::new().context("HTTP client")?;
    Ok(crate::registry(Arc::new(http)))
}

async fn open_store(cli: &Cli) -> Result<Arc<dyn Store>> {
    let synchronous_full = cli.sqlite_sync == SqliteSync::Full;
    // The driver's error already names its cause; its source chain repeats it.
    let store = SqliteStore::open(&SqliteOptions { url: cli.db.clone(), synchronous_full })
        .await
        .map_err(|e| anyhow::anyhow!("opening database {}: {e}", cli.db))?;
    Ok(Arc::new(store))
}

fn engine(cli: &Cli, store: Arc<dyn Store>, registry: Registry, worker: bool) -> Engine {
    let options = EngineOptions { max_concurrent_runs: cli.max_runs, lease: cli.lease, worker, ..Default::default() };
    Engine::start(store, registry, Arc::new(SystemClock), options)
}

async fn execute(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Validate { files } => {
            let registry = registry()?;
            let mut failed = false;
            for file in files {
                match compile::compile_file(file, &registry) {
                    Ok(def) => println!("{}: ok ({} steps)", file.display(), def.workflow.step_ids().count()),
                    Err(errors) => {
                        failed = true;
                        for e in &errors.0 {
                            eprintln!("{}", located(file, e));
                        }
                    }
                }
            }
            Ok(if failed { ExitCode::from(EXIT_INVALID) } else { ExitCode::SUCCESS })
        }
        Command::Run { file, input, idempotency_key } => {
            let registry = registry()?;
            let def = match compile::compile_file(file, &registry) {
                Ok(def) => def,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{}", located(file, e));
                    }
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let input = match read_input(input) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: --input: {e:#}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
            };
            let store = open_store(&cli).await?;
            let engine = engine(&cli, store, registry, false);
            let submitted = match idempotency_key {
                Some(key) => engine.submit_once(&def, input, key).await,
                None => engine.submit(&def, input).await.map(|id| Submitted { id, created: true }),
            };
            let id = match submitted {
                Ok(Submitted { id, created: true }) => {
                    eprintln!("run {id} started ({} v{})", def.workflow.name(), def.workflow.version());
                    id
                }
                Ok(Submitted { id, created: false }) => {
                    eprintln!("run {id} already exists for this idempotency key");
                    // Continue it here if nobody drives it (its process died);
                    // a finished or live run is only reported.
                    let unfinished = engine.store().run(&id).await?.is_some_and(|r| !r.status.is_finished());
                    if unfinished {
                        match engine.resume(&id).await {
                            Ok(()) | Err(EngineError::Conflict(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    id
                }
                Err(EngineError::InvalidInput(errors)) => {
                    for e in errors {
                        eprintln!("{}: {e}", file.display());
                    }
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e @ EngineError::Conflict(_)) => {
                    eprintln!("error: {e}");
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
        Command::Worker { exit_when_idle } => {
            let store = open_store(&cli).await?;
            let engine = engine(&cli, store, registry()?, true);
            eprintln!("worker started (database {})", cli.db);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("stopping: leases released, unfinished runs continue in the next worker");
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
        Command::Bench { workload } => {
            let chosen: &[&str] = match workload {
                Workload::All => &["chain40", "fanout100"],
                Workload::Chain40 => &["chain40"],
                Workload::Fanout100 => &["fanout100"],
            };
            crate::bench::run(chosen, cli.sqlite_sync == SqliteSync::Full).await?;
            Ok(ExitCode::SUCCESS)
        }
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

fn read_input(text: &str) -> Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => text.to_owned(),
    };
    serde_json::from_str(&text).context("not valid JSON")
}

/// Waits for a run, prints its result to stdout and its steps to stderr.
async fn wait_and_report(engine: &Engine, id: &str) -> Result<ExitCode> {
    let outcome = tokio::select! {
        r = engine.wait(id) => r?,
        _ = tokio::signal::ctrl_c() => {
            engine.shutdown().await;
            eprintln!("interrupted; the run is kept. Continue it with: switchyard runs resume {id}");
            return Ok(ExitCode::from(130));
        }
    };
    print_steps(engine.store(), id).await?;
    Ok(print_outcome(&outcome))
}

async fn print_steps(store: &Arc<dyn Store>, id: &str) -> Result<()> {
    let journal = store.journal(id).await?;
    eprint!("{}", report::render(&report::steps(&journal)));
    Ok(())
}

fn print_outcome(outcome: &RunOutcome) -> ExitCode {
    match outcome.status {
        RunStatus::Succeeded => {
            let output = outcome.output.clone().unwrap_or(Value::Null);
            println!("{}", serde_json::to_string_pretty(&output).expect("JSON prints"));
            eprintln!("run {} succeeded", outcome.id);
            ExitCode::SUCCESS
        }
        status => {
            let why = outcome.error.as_ref().map(|e| format!(": {}: {}", e.code, e.message)).unwrap_or_default();
            eprintln!("run {} {status}{why}", outcome.id);
            if status == RunStatus::Failed {
                eprintln!("resume it with: switchyard runs resume {}", outcome.id);
            }
            ExitCode::FAILURE
        }
    }
}

async fn runs(cli: &Cli, store: Arc<dyn Store>, command: &RunsCommand) -> Result<ExitCode> {
    match command {
        RunsCommand::List { status, limit } => {
            let runs = store.runs(*status, false, *limit).await?;
            println!("{:<36}  {:<24}  {:<10}  CREATED", "RUN", "WORKFLOW", "STATUS");
            for r in runs {
                println!("{:<36}  {:<24}  {:<10}  {}", r.id, r.workflow, r.status, report::format_ms(r.created_at));
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Show { run, journal } => {
            let Some(r) = store.run(run).await? else {
                eprintln!("error: no run {run:?}");
                return Ok(ExitCode::from(EXIT_INVALID));
            };
            println!("run:      {}", r.id);
            if let Some(parent) = &r.parent_id {
                println!("parent:   {parent}");
            }
            println!("workflow: {} v{}", r.workflow, r.version);
            println!("status:   {}", r.status);
            println!("created:  {}", report::format_ms(r.created_at));
            if let Some(at) = r.wake_at.filter(|_| r.status == RunStatus::Waiting) {
                println!("wakes:    {}", report::format_ms(at));
            }
            println!("input:    {}", r.input);
            if let Some(out) = &r.output {
                println!("output:   {out}");
            }
            if let Some(e) = &r.error {
                println!("error:    {}: {}", e.code, e.message);
            }
            let entries = store.journal(run).await?;
            println!("steps:");
            print!("{}", report::render(&report::steps(&entries)));
            let children = store.children(run).await?;
            if !children.is_empty() {
                println!("child runs: {}", children.len());
            }
            if *journal {
                println!("journal:");
                for e in entries {
                    println!("  {:>4} {} {}", e.seq, report::format_ms(e.at), serde_json::to_string(&e.event)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RunsCommand::Resume { run } => {
            let engine = engine(cli, store, registry()?, false);
            match engine.resume(run).await {
                Ok(()) => {}
                Err(e @ (EngineError::NotFound(_) | EngineError::Conflict(_))) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            }
            eprintln!("run {run} resumed");
            wait_and_report(&engine, run).await
        }
        RunsCommand::Cancel { run } => {
            let engine = engine(cli, store, registry()?, false);
            let result = match engine.cancel(run).await {
                Ok(r) => r,
                Err(e @ (EngineError::NotFound(_) | EngineError::Conflict(_))) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_INVALID));
                }
                Err(e) => return Err(e.into()),
            };
            engine.shutdown().await;
            match result {
                Cancelled::Done => println!("run {run} cancelled"),
                Cancelled::Requested => {
                    println!("cancellation of run {run} requested; the process running it stops it")
                }
                Cancelled::AlreadyFinished(status) => println!("run {run} already {status}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
