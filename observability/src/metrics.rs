//! Metrics: OpenTelemetry instruments, exported over OTLP when an endpoint
//! is configured and served as Prometheus text by a long-lived process
//! (`switchyard worker --metrics-listen`).
//!
//! Label values stay bounded: workflow names, step kinds, statuses, model
//! and provider names. Never run ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::ConfigError;
use crate::semconv::*;

/// Buckets of durations in seconds (1 ms to 10 min).
const SECONDS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0];
/// Buckets of token counts.
const TOKENS: [f64; 12] =
    [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0];
/// Buckets of journal batch sizes.
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0, 2048.0];

/// The instruments, and the gauges the engine keeps current.
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: Option<prometheus::Registry>,
    runs_started: Counter<u64>,
    runs_finished: Counter<u64>,
    run_duration: Histogram<f64>,
    /// Its count is the attempts ended (by kind and status).
    step_duration: Histogram<f64>,
    step_retries: Counter<u64>,
    commit_duration: Histogram<f64>,
    commit_batch: Histogram<u64>,
    token_usage: Histogram<u64>,
    operation_duration: Histogram<f64>,
    llm_cost: Counter<f64>,
    spans_dropped: Counter<u64>,
    /// Read by the observable gauges.
    gauges: Arc<Gauges>,
}

/// Values the engine sets; read when metrics are collected.
#[derive(Default)]
pub struct Gauges {
    pub queued: AtomicU64,
    pub active: AtomicU64,
    pub parked: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("prometheus", &self.registry.is_some()).finish()
    }
}

impl Metrics {
    /// OTLP metrics when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `..._METRICS_ENDPOINT`) is set and `OTEL_METRICS_EXPORTER` is not
    /// `none`; Prometheus text when `prometheus`. `None` when neither.
    pub(crate) fn from_vars(
        env: &dyn Fn(&str) -> Option<String>,
        resource: &Resource,
        prometheus: bool,
    ) -> Result<Option<Self>, ConfigError> {
        let off = match env("OTEL_METRICS_EXPORTER").as_deref().map(str::trim) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("none") => true,
            Some(v) if v.eq_ignore_ascii_case("otlp") => false,
            Some(_) => return Err(ConfigError::new("OTEL_METRICS_EXPORTER", "must be otlp or none")),
        };
        let endpoint = crate::endpoint(env, "METRICS", "v1/metrics")?.filter(|_| !off);
        if endpoint.is_none() && !prometheus {
            return Ok(None);
        }
        let mut builder = SdkMeterProvider::builder().with_resource(resource.clone());
        if let Some(endpoint) = endpoint {
            let protocol = crate::protocol(env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")?;
            let bad = crate::unusable;
            let exporter = match protocol {
                crate::Protocol::HttpProtobuf => {
                    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
                    let mut builder = opentelemetry_otlp::MetricExporter::builder()
                        .with_http()
                        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                        .with_endpoint(&endpoint);
                    if let Some(client) = crate::plain_http_client(env, "METRICS", &endpoint)? {
                        builder = builder.with_http_client(client);
                    }
                    builder.build().map_err(bad)?
                }
                #[cfg(feature = "grpc")]
                crate::Protocol::Grpc => {
                    use opentelemetry_otlp::WithExportConfig;
                    // tonic's channel runs on a runtime of its own: the
                    // periodic reader's thread is not in one.
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name("otlp-grpc")
                        .enable_all()
                        .build()
                        .map_err(|e| {
                            ConfigError::new("OTEL_EXPORTER_OTLP_PROTOCOL", format!("starting the gRPC runtime: {e}"))
                        })?;
                    let exporter = {
                        let _guard = rt.enter();
                        opentelemetry_otlp::MetricExporter::builder()
                            .with_tonic()
                            .with_endpoint(endpoint)
                            .build()
                            .map_err(bad)?
                    };
                    // Kept for the life of the process.
                    std::mem::forget(rt);
                    exporter
                }
            };
            builder = builder.with_reader(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build());
        }
        let registry = if prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(|e| ConfigError::new("--metrics-listen", e.to_string()))?;
            builder = builder.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        Ok(Some(Self::build(builder.build(), registry)))
    }

    fn build(provider: SdkMeterProvider, registry: Option<prometheus::Registry>) -> Self {
        let meter = provider.meter("switchyard");
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(SECONDS.to_vec())
                .build()
        };
        let gauges = Arc::new(Gauges::default());
        let observe = |name: &'static str, description: &'static str, read: fn(&Gauges) -> u64| {
            let g = gauges.clone();
            meter
                .u64_observable_gauge(name)
                .with_description(description)
                .with_callback(move |o| o.observe(read(&g), &[]))
                .build()
        };
        // Observable gauges live as long as the provider.
        let _ = observe("switchyard.runs.queued", "Root runs waiting for a concurrency slot", |g| {
            g.queued.load(Ordering::Relaxed)
        });
        let _ =
            observe("switchyard.runs.active", "Root runs driven by this process", |g| g.active.load(Ordering::Relaxed));
        let _ = observe("switchyard.runs.parked", "Runs parked in the store (waiting for a timer or a signal)", |g| {
            g.parked.load(Ordering::Relaxed)
        });
        let metrics = Self {
            runs_started: meter.u64_counter("switchyard.runs.started").with_description("Runs started").build(),
            runs_finished: meter.u64_counter("switchyard.runs.finished").with_description("Runs finished").build(),
            run_duration: seconds("switchyard.run.duration", "Run duration, start to end"),
            step_duration: seconds(
                "switchyard.step.duration",
                "Step attempt duration; its count is the attempts ended, by kind and status",
            ),
            step_retries: meter
                .u64_counter("switchyard.step.retries")
                .with_description("Step attempts that failed and will be retried")
                .build(),
            commit_duration: seconds("switchyard.journal.commit.duration", "Journal group commit latency"),
            commit_batch: meter
                .u64_histogram("switchyard.journal.commit.batch_size")
                .with_description("Writes per journal group commit")
                .with_boundaries(BATCH.to_vec())
                .build(),
            token_usage: meter
                .u64_histogram(GEN_AI_CLIENT_TOKEN_USAGE)
                .with_unit("{token}")
                .with_description("Tokens used per model call")
                .with_boundaries(TOKENS.to_vec())
                .build(),
            operation_duration: seconds(GEN_AI_CLIENT_OPERATION_DURATION, "Model call duration"),
            llm_cost: meter
                .f64_counter("switchyard.llm.cost_usd")
                .with_description("Model cost in US dollars, by the prices in SWITCHYARD_LLM_PRICES")
                .build(),
            spans_dropped: meter
                .u64_counter("switchyard.spans.dropped")
                .with_description("Spans dropped: the export queue was full or the receiver refused them")
                .build(),
            provider,
            registry,
            gauges,
        };
        // Counters that may stay at zero for a long time are exported from
        // the start, so dashboards and alerts find them.
        metrics.spans_dropped.add(0, &[]);
        metrics.step_retries.add(0, &[]);
        metrics
    }

    /// The gauges the engine keeps current.
    pub fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    pub fn run_started(&self, workflow: &str) {
        self.runs_started.add(1, &[KeyValue::new(GEN_AI_WORKFLOW_NAME, workflow.to_owned())]);
    }

    pub fn run_finished(&self, workflow: &str, status: &'static str, seconds: f64) {
        let attrs = [KeyValue::new(GEN_AI_WORKFLOW_NAME, workflow.to_owned()), KeyValue::new(RUN_STATUS, status)];
        self.runs_finished.add(1, &attrs);
        self.run_duration.record(seconds, &attrs);
    }

    /// An attempt ended with `status` (`succeeded`, `failed`, `retrying`,
    /// `interrupted`, `cancelled`).
    pub fn attempt_ended(&self, kind: &'static str, status: &'static str, seconds: f64) {
        let attrs = [KeyValue::new(STEP_KIND, kind), KeyValue::new(STEP_STATUS, status)];
        self.step_duration.record(seconds, &attrs);
        if status == "retrying" {
            self.step_retries.add(1, &[KeyValue::new(STEP_KIND, kind)]);
        }
    }

    pub fn committed(&self, writes: usize, seconds: f64) {
        self.commit_duration.record(seconds, &[]);
        self.commit_batch.record(writes as u64, &[]);
    }

    /// A model call ended (`error`: its error type, if it failed).
    pub fn model_call(&self, call: &ModelCall<'_>) {
        let mut attrs = vec![
            KeyValue::new(GEN_AI_OPERATION_NAME, OP_CHAT),
            KeyValue::new(GEN_AI_PROVIDER_NAME, call.provider.to_owned()),
            KeyValue::new(GEN_AI_REQUEST_MODEL, call.request_model.to_owned()),
            KeyValue::new(GEN_AI_RESPONSE_MODEL, call.response_model.to_owned()),
        ];
        if let Some(error) = call.error {
            attrs.push(KeyValue::new(ERROR_TYPE, error.to_owned()));
        }
        self.operation_duration.record(call.seconds, &attrs);
        if call.error.is_none() {
            for (kind, n) in [("input", call.input_tokens), ("output", call.output_tokens)] {
                let mut a = attrs.clone();
                a.push(KeyValue::new(GEN_AI_TOKEN_TYPE, kind));
                self.token_usage.record(n, &a);
            }
        }
        if let Some(cost) = call.cost {
            self.llm_cost.add(cost, &attrs[1..4]);
        }
    }

    pub(crate) fn dropped_spans(&self, n: u64) {
        self.spans_dropped.add(n, &[]);
    }

    /// The metrics in the Prometheus text format, if served.
    pub fn prometheus_text(&self) -> Option<String> {
        use prometheus::Encoder;
        let registry = self.registry.as_ref()?;
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).ok()?;
        String::from_utf8(out).ok()
    }

    pub(crate) fn shutdown(&self, timeout: Duration) {
        let _ = self.provider.shutdown_with_timeout(timeout);
    }
}

/// One model call, for the GenAI metrics.
pub struct ModelCall<'a> {
    pub provider: &'a str,
    pub request_model: &'a str,
    pub response_model: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub seconds: f64,
    pub error: Option<&'a str>,
    /// In USD, by the configured prices.
    pub cost: Option<f64>,
}
