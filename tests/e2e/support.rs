//! Shared setup: an engine on a fresh SQLite file, workflows from text, and a
//! driver for the manual clock.

use std::future::Future;
use std::sync::Arc;

use switchyard_integrations::http::ReqwestHttp;
use switchyard_integrations::llm::{ApiKey, Limits, ProviderConfig, Providers};
use switchyard_orchestrator::compile::compile_file;
use switchyard_orchestrator::journal::Event;
use switchyard_orchestrator::store::{JournalEntry, SqliteOptions, SqliteStore, Store};
use switchyard_orchestrator::{Definition, Engine, EngineOptions};
use switchyard_steps::llm::NoModels;
use switchyard_steps::{Clock, ManualClock, Registry};
use switchyard_tests::{CounterServer, ModelServer, TempDir, temp_dir};

pub fn registry() -> Registry {
    switchyard_tests::install_crypto_provider();
    switchyard_orchestrator::registry(Arc::new(ReqwestHttp::new().expect("http client")), Arc::new(NoModels))
}

pub async fn store(dir: &TempDir) -> Arc<dyn Store> {
    let url = dir.join("switchyard.db").display().to_string();
    Arc::new(SqliteStore::open(&SqliteOptions { url, synchronous_full: false }).await.expect("open store"))
}

pub fn engine(store: Arc<dyn Store>, clock: Arc<dyn Clock>, options: EngineOptions) -> Engine {
    Engine::start(store, registry(), clock, options)
}

/// Writes `yaml` to `{dir}/{name}` and compiles it.
pub fn compile(dir: &TempDir, name: &str, yaml: &str) -> Definition {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write workflow");
    compile_file(&path, &registry()).unwrap_or_else(|e| panic!("{name} does not compile:\n{e}"))
}

/// Polls `fut` to completion, moving the manual clock to the next deadline
/// whenever something sleeps on it: time passes only while the engine waits.
pub async fn drive<F: Future>(clock: &ManualClock, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..10_000 {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            deadline = clock.next_sleeper() => clock.advance_to(deadline),
        }
    }
    panic!("the run did not finish after 10000 clock advances");
}

pub async fn journal(store: &Arc<dyn Store>, run: &str) -> Vec<JournalEntry> {
    store.journal(run).await.expect("journal")
}

/// Events of one step, in order.
pub fn step_events<'a>(journal: &'a [JournalEntry], step: &str) -> Vec<&'a JournalEntry> {
    journal
        .iter()
        .filter(|e| match &e.event {
            Event::StepStarted { step: s, .. }
            | Event::StepSucceeded { step: s, .. }
            | Event::StepFailed { step: s, .. }
            | Event::StepSuspended { step: s, .. }
            | Event::StepSkipped { step: s, .. }
            | Event::StepOp { step: s, .. } => s == step,
            _ => false,
        })
        .collect()
}

/// A local HTTP server, a fresh database and an engine on it.
pub struct Fixture {
    pub server: CounterServer,
    pub dir: TempDir,
    pub store: Arc<dyn Store>,
    pub engine: Engine,
}

impl Fixture {
    pub async fn new(name: &str, clock: Arc<dyn Clock>) -> Self {
        let server = CounterServer::start().await;
        let dir = temp_dir(name);
        let store = store(&dir).await;
        let engine = engine(store.clone(), clock, EngineOptions::default());
        Self { server, dir, store, engine }
    }
}

/// Stops what a test started.
pub async fn stop(engine: Engine, server: CounterServer) {
    engine.shutdown().await;
    server.stop().await;
}

/// An API key that tests can look for where it must not be.
pub const CANARY_KEY: &str = "sk-canary-7f3a9c2e41d8b6";

/// The kinds, with the model provider `default` on `server`.
pub fn model_registry(server: &ModelServer, limits: Limits) -> Registry {
    switchyard_tests::install_crypto_provider();
    let http = ReqwestHttp::new().expect("http client");
    let provider = ProviderConfig {
        name: "default".into(),
        base_url: server.base_url(),
        api_key: ApiKey::new(CANARY_KEY).unwrap(),
        default_model: "test-model".into(),
        limits,
        system: "openai".to_owned(),
    };
    let models = Providers::new(http.client(), vec![provider]);
    switchyard_orchestrator::registry(Arc::new(http), Arc::new(models))
}

/// A local model server, a fresh database and an engine whose provider
/// `default` is that server.
pub struct ModelSetup {
    pub server: ModelServer,
    pub dir: TempDir,
    pub store: Arc<dyn Store>,
    pub engine: Engine,
    pub registry: Registry,
}

impl ModelSetup {
    pub async fn new(name: &str, clock: Arc<dyn Clock>, limits: Limits) -> Self {
        Self::with_options(name, clock, limits, EngineOptions::default()).await
    }

    pub async fn with_options(name: &str, clock: Arc<dyn Clock>, limits: Limits, options: EngineOptions) -> Self {
        let server = ModelServer::start().await;
        let dir = temp_dir(name);
        let store = store(&dir).await;
        let registry = model_registry(&server, limits);
        let engine = Engine::start(store.clone(), registry.clone(), clock, options);
        Self { server, dir, store, engine, registry }
    }

    /// Writes `yaml` to `{dir}/{file}` (for a file another one calls).
    pub fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.join(file), yaml).expect("write workflow");
    }

    /// Writes `yaml` to `{dir}/{file}` and compiles it.
    pub fn compile_as(&self, file: &str, yaml: &str) -> Definition {
        self.write(file, yaml);
        compile_file(&self.dir.join(file), &self.registry).unwrap_or_else(|e| panic!("{file} does not compile:\n{e}"))
    }

    pub fn compile(&self, yaml: &str) -> Definition {
        self.compile_as("wf.yaml", yaml)
    }

    pub async fn stop(self) {
        self.engine.shutdown().await;
        self.server.stop().await;
    }
}
