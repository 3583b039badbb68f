//! Span export: the engine builds finished spans from its journal and hands
//! them to [`Telemetry::emit`], which queues them for a background thread
//! that exports batches over OTLP.
//!
//! Export never blocks or fails a run: the queue is bounded, a span that
//! finds it full is dropped and counted ([`Telemetry::dropped_spans`]), and
//! so is every span of a batch the receiver did not take.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext as OtelContext, SpanId as OtelSpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId as OtelTraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value as OtelValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanExporter, SpanLinks};

use crate::ConfigError;

/// A W3C trace context: the trace and the span that is the parent of what
/// comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// The `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), u8::from(self.sampled))
    }

    /// Parses a `traceparent` value (version 00; later versions are read
    /// as 00, as the W3C spec asks). The all-zero ids are invalid.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let parts: Vec<&str> = value.split('-').collect();
        let invalid = || format!("{value:?} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)");
        if parts.len() < 4 || (parts[0] == "00" && parts.len() != 4) || parts[0].len() != 2 || parts[0] == "ff" {
            return Err(invalid());
        }
        let version = unhex::<1>(parts[0]).ok_or_else(invalid)?;
        let trace_id = unhex::<16>(parts[1]).ok_or_else(invalid)?;
        let span_id = unhex::<8>(parts[2]).ok_or_else(invalid)?;
        let flags = unhex::<1>(parts[3]).ok_or_else(invalid)?;
        if version[0] == 0xff || trace_id == [0; 16] || span_id == [0; 8] {
            return Err(invalid());
        }
        Ok(Self { trace_id, span_id, sampled: flags[0] & 1 == 1 })
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A span id derived from `parts`: the same parts give the same id in every
/// process, so a span started by one process can be ended, or parented, by
/// the next one after a crash.
pub fn derived_span_id(trace_id: &[u8; 16], parts: &[&str]) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(trace_id);
    for part in parts {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    let digest = ctx.finish();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest.as_ref()[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// The span ids of one run: a key derived once from the trace and the run
/// ([`derived_span_id`]), and for each span a 64-bit bijection (the
/// splitmix64 finalizer) of the key xor the span's packed coordinates. Ids
/// within a run never collide (distinct coordinates, distinct ids); every
/// process computes the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    key: u64,
}

impl SpanIds {
    pub fn new(trace_id: &[u8; 16], run: &str) -> Self {
        Self { key: u64::from_be_bytes(derived_span_id(trace_id, &["run", run])) }
    }

    /// The id of span `tag` (0..8) at `(a, b, c)`: `a`, `b` below 2^20,
    /// `c` below 2^21 (higher bits are dropped).
    pub fn id(&self, tag: u8, a: u32, b: u32, c: u32) -> [u8; 8] {
        let packed = (u64::from(tag & 7) << 61)
            | ((u64::from(a) & 0xF_FFFF) << 41)
            | ((u64::from(b) & 0xF_FFFF) << 21)
            | (u64::from(c) & 0x1F_FFFF);
        let mut z = packed ^ self.key;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // The all-zero id is invalid; 0 has exactly one preimage.
        if z == 0 { [0, 0, 0, 0, 0, 0, 0, 1] } else { z.to_be_bytes() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    Client,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    /// A constant: not copied.
    Static(&'static str),
    /// Shared text (a workflow name on every span of a run): not copied.
    Shared(Arc<str>),
    Int(i64),
    F64(f64),
    Bool(bool),
    Strs(Vec<String>),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Attr::Str(s.to_owned())
    }
}
impl From<String> for Attr {
    fn from(s: String) -> Self {
        Attr::Str(s)
    }
}
impl From<i64> for Attr {
    fn from(n: i64) -> Self {
        Attr::Int(n)
    }
}
impl From<u32> for Attr {
    fn from(n: u32) -> Self {
        Attr::Int(n.into())
    }
}
impl From<u64> for Attr {
    fn from(n: u64) -> Self {
        Attr::Int(n.min(i64::MAX as u64) as i64)
    }
}
impl From<f64> for Attr {
    fn from(n: f64) -> Self {
        Attr::F64(n)
    }
}
impl From<bool> for Attr {
    fn from(b: bool) -> Self {
        Attr::Bool(b)
    }
}

/// A finished span, as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    /// The parent is in another process (the caller of `--traceparent`).
    pub parent_remote: bool,
    pub kind: Kind,
    pub name: String,
    /// Unix milliseconds.
    pub start_ms: i64,
    pub end_ms: i64,
    pub attributes: Vec<(&'static str, Attr)>,
    /// `Some(description)`: the span's status is error.
    pub error: Option<String>,
    pub links: Vec<SpanContext>,
}

/// Environment variable that puts content (prompts, answers, step inputs
/// and outputs) on spans.
pub const CAPTURE_CONTENT_ENV: &str = "SWITCHYARD_OTEL_CAPTURE_CONTENT";

/// Spans queued at most; more are dropped (counted).
const DEFAULT_QUEUE: usize = 2048;
/// Spans sent in one export at most.
const DEFAULT_BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const DEFAULT_DELAY: Duration = Duration::from_secs(1);

/// The process's telemetry: where spans go and what they may hold. Cheap
/// to clone; [`Telemetry::disabled`] costs nothing.
#[derive(Clone, Default)]
pub struct Telemetry {
    spans: Option<Arc<Spans>>,
    capture_content: bool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.spans.is_some())
            .field("capture_content", &self.capture_content)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

struct Spans {
    queue: Arc<Queue>,
    sampler: Box<dyn ShouldSample>,
    dropped: Arc<AtomicU64>,
    exported: Arc<AtomicU64>,
}

/// The spans waiting for export. Senders only lock and push; the export
/// thread is woken once a batch is full (or by its timer), not per span.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    /// Flushes done, for [`Telemetry::shutdown`].
    flushed: Condvar,
    capacity: usize,
    batch: usize,
}

#[derive(Default)]
struct QueueState {
    spans: VecDeque<Span>,
    /// When the oldest waiting span was queued (the batch timer).
    since: Option<Instant>,
    /// Flushes asked for / done.
    flush_asked: u64,
    flush_done: u64,
    stop: bool,
}

impl Telemetry {
    /// No export, no content: what runs get when nothing is configured.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// From the standard OpenTelemetry variables: spans are exported when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
    /// unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    /// Call it outside an async context (it may start the exporter's
    /// threads).
    /// `prometheus`: also keep metrics to serve as Prometheus text.
    pub fn from_env(prometheus: bool) -> Result<Self, ConfigError> {
        Self::from_vars(|k| std::env::var(k).ok(), prometheus)
    }

    /// [`Telemetry::from_env`] with the variables read through `var`
    /// (headers, timeouts, the resource and the sampler still come from the
    /// process environment, read by the SDK).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, prometheus: bool) -> Result<Self, ConfigError> {
        let env = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let capture_content = match env(CAPTURE_CONTENT_ENV).as_deref().map(str::trim) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => return Err(ConfigError::new(CAPTURE_CONTENT_ENV, "must be true or false")),
        };
        let disabled = match env("OTEL_SDK_DISABLED").as_deref().map(str::trim) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => return Err(ConfigError::new("OTEL_SDK_DISABLED", "must be true or false")),
        };
        let resource = resource();
        // Disabled: nothing goes out over OTLP; Prometheus text, asked for
        // explicitly, is still served.
        let otlp_env = |k: &str| if disabled { None } else { env(k) };
        let metrics = crate::metrics::Metrics::from_vars(&otlp_env, &resource, prometheus)?.map(Arc::new);
        let endpoint = crate::endpoint(&env, "TRACES", "v1/traces")?;
        let traces_off = match env("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("none") => true,
            Some(v) if v.eq_ignore_ascii_case("otlp") => false,
            Some(_) => return Err(ConfigError::new("OTEL_TRACES_EXPORTER", "must be otlp or none")),
        };
        if disabled || traces_off || endpoint.is_none() {
            return Ok(Self { spans: None, capture_content, metrics });
        }
        let Some(endpoint) = endpoint else { return Ok(Self { spans: None, capture_content, metrics }) };
        let protocol = crate::protocol(&env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")?;
        let client = match protocol {
            crate::Protocol::HttpProtobuf => crate::plain_http_client(&env, "TRACES", &endpoint)?,
            #[cfg(feature = "grpc")]
            crate::Protocol::Grpc => None,
        };
        let exporter = SpanExporterKind::build(protocol, &endpoint, client, &resource)?;
        let number = |name: &str, default: usize| -> Result<usize, ConfigError> {
            match env(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ConfigError::new(name, "must be a positive whole number")),
            }
        };
        let queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE)?.min(1 << 20);
        let batch = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_BATCH)?.min(queue_size);
        let delay = number("OTEL_BSP_SCHEDULE_DELAY", DEFAULT_DELAY.as_millis() as usize)?;
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            flushed: Condvar::new(),
            capacity: queue_size,
            batch,
        });
        let dropped = Arc::new(AtomicU64::new(0));
        let exported = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            queue: queue.clone(),
            exporter,
            delay: Duration::from_millis(delay as u64),
            dropped: dropped.clone(),
            exported: exported.clone(),
            warned: AtomicBool::new(false),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("otlp-spans".into())
            .spawn(move || worker.run())
            .map_err(|e| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", format!("starting the exporter: {e}")))?;
        // The SDK's reading of OTEL_TRACES_SAMPLER / _ARG.
        let sampler = opentelemetry_sdk::trace::Config::default().sampler;
        let spans = Spans { queue, sampler, dropped, exported };
        Ok(Self { spans: Some(Arc::new(spans)), capture_content, metrics })
    }

    /// Spans are exported.
    pub fn is_tracing(&self) -> bool {
        self.spans.is_some()
    }

    /// Content may go on spans (`SWITCHYARD_OTEL_CAPTURE_CONTENT=true`);
    /// a confidential workflow's never does.
    pub fn capture_content(&self) -> bool {
        self.capture_content
    }

    /// The metric instruments, if metrics are exported or served.
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.metrics.as_ref()
    }

    /// Whether a trace is recorded, by `OTEL_TRACES_SAMPLER` (default:
    /// parent-based, always on): decided once per run from its trace id and
    /// the caller's span, the same way in every process.
    pub fn sampled(&self, trace_id: [u8; 16], parent: Option<&SpanContext>) -> bool {
        let Some(spans) = &self.spans else { return false };
        let cx = parent.map(|p| {
            let flags = if p.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            let remote = OtelContext::new(
                OtelTraceId::from_bytes(p.trace_id),
                OtelSpanId::from_bytes(p.span_id),
                flags,
                true,
                TraceState::default(),
            );
            opentelemetry::Context::new().with_remote_span_context(remote)
        });
        let result = spans.sampler.should_sample(
            cx.as_ref(),
            OtelTraceId::from_bytes(trace_id),
            "invoke_workflow",
            &SpanKind::Internal,
            &[],
            &[],
        );
        result.decision == SamplingDecision::RecordAndSample
    }

    /// Queues a finished span for export; drops it (counted) if the queue
    /// is full.
    pub fn emit(&self, span: Span) {
        self.emit_all(std::iter::once(span));
    }

    /// Queues spans for export under one lock; those that find the queue
    /// full are dropped (counted).
    pub fn emit_all(&self, batch: impl IntoIterator<Item = Span>) {
        let Some(spans) = &self.spans else { return };
        let q = &spans.queue;
        let mut dropped = 0u64;
        let wake = {
            let mut state = q.state.lock().unwrap_or_else(|p| p.into_inner());
            let before = state.spans.len();
            for span in batch {
                if state.stop || state.spans.len() >= q.capacity {
                    dropped += 1;
                } else {
                    state.spans.push_back(span);
                }
            }
            if before == 0 && !state.spans.is_empty() {
                state.since = Some(Instant::now());
            }
            // Woken when spans start waiting (its timer starts) and when a
            // batch is full.
            (before == 0 && !state.spans.is_empty()) || (before < q.batch && state.spans.len() >= q.batch)
        };
        if wake {
            q.ready.notify_one();
        }
        if dropped > 0 {
            spans.dropped.fetch_add(dropped, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.dropped_spans(dropped);
            }
        }
    }

    /// Spans dropped so far: the queue was full, or the receiver did not
    /// take their batch.
    pub fn dropped_spans(&self) -> u64 {
        self.spans.as_ref().map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }

    /// Spans the receiver accepted so far.
    pub fn exported_spans(&self) -> u64 {
        self.spans.as_ref().map_or(0, |s| s.exported.load(Ordering::Relaxed))
    }

    /// Exports what is queued now, waiting at most `timeout`; `false` if
    /// it did not finish in time. Call it outside an async context.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.flush_until(Instant::now() + timeout)
    }

    fn flush_until(&self, deadline: Instant) -> bool {
        let Some(spans) = &self.spans else { return true };
        let q = &spans.queue;
        let mut state = q.state.lock().unwrap_or_else(|p| p.into_inner());
        state.flush_asked += 1;
        let target = state.flush_asked;
        q.ready.notify_one();
        // Waits for the flush, never past the deadline.
        while state.flush_done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.stop {
                return false;
            }
            state = q.flushed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Exports what is queued, waiting at most `timeout`, then stops the
    /// exporter (spans emitted later are dropped). Also flushes metrics.
    /// Call it outside an async context.
    pub fn shutdown(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Some(spans) = &self.spans {
            self.flush_until(deadline);
            // The thread is told to stop (it is not joined: a hung receiver
            // keeps it only until its export times out).
            let q = &spans.queue;
            q.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            q.ready.notify_one();
        }
        if let Some(m) = &self.metrics {
            m.shutdown(deadline.saturating_duration_since(Instant::now()));
        }
    }
}

/// The resource: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the
/// SDK's detectors), with `service.name` `switchyard` unless they set one.
pub(crate) fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named { builder.build() } else { builder.with_service_name("switchyard").build() }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("switchyard").with_version(env!("CARGO_PKG_VERSION")).build()
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn context(c: &SpanContext) -> OtelContext {
    let flags = if c.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    OtelContext::new(
        OtelTraceId::from_bytes(c.trace_id),
        OtelSpanId::from_bytes(c.span_id),
        flags,
        false,
        TraceState::default(),
    )
}

fn value(a: Attr) -> OtelValue {
    match a {
        Attr::Str(s) => OtelValue::from(s),
        Attr::Static(s) => OtelValue::from(s),
        Attr::Shared(s) => OtelValue::String(s.into()),
        Attr::Int(n) => OtelValue::I64(n),
        Attr::F64(n) => OtelValue::F64(n),
        Attr::Bool(b) => OtelValue::Bool(b),
        Attr::Strs(list) => OtelValue::Array(opentelemetry::Array::String(list.into_iter().map(Into::into).collect())),
    }
}

fn span_data(span: Span) -> SpanData {
    let links = span.links.iter().map(|l| opentelemetry::trace::Link::with_context(context(l))).collect::<Vec<_>>();
    let mut span_links = SpanLinks::default();
    span_links.links = links;
    SpanData {
        span_context: context(&span.context),
        parent_span_id: span.parent.map(OtelSpanId::from_bytes).unwrap_or(OtelSpanId::INVALID),
        parent_span_is_remote: span.parent_remote,
        span_kind: match span.kind {
            Kind::Internal => SpanKind::Internal,
            Kind::Client => SpanKind::Client,
        },
        name: Cow::Owned(span.name),
        start_time: time(span.start_ms),
        end_time: time(span.end_ms.max(span.start_ms)),
        attributes: span.attributes.into_iter().map(|(k, v)| KeyValue::new(k, value(v))).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: span_links,
        status: match span.error {
            Some(description) => Status::error(description),
            None => Status::Unset,
        },
        instrumentation_scope: scope(),
    }
}

/// The OTLP span exporter for the configured protocol.
enum SpanExporterKind {
    Http(opentelemetry_otlp::SpanExporter),
    #[cfg(feature = "grpc")]
    Grpc(opentelemetry_otlp::SpanExporter, tokio::runtime::Runtime),
}

impl SpanExporterKind {
    fn build(
        protocol: crate::Protocol,
        endpoint: &str,
        client: Option<reqwest::blocking::Client>,
        resource: &Resource,
    ) -> Result<Self, ConfigError> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let bad = crate::unusable;
        let mut kind = match protocol {
            crate::Protocol::HttpProtobuf => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint);
                if let Some(client) = client {
                    builder = builder.with_http_client(client);
                }
                Self::Http(builder.build().map_err(bad)?)
            }
            #[cfg(feature = "grpc")]
            crate::Protocol::Grpc => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
                    ConfigError::new("OTEL_EXPORTER_OTLP_PROTOCOL", format!("starting the gRPC runtime: {e}"))
                })?;
                let exporter = {
                    let _guard = rt.enter();
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .build()
                        .map_err(bad)?
                };
                Self::Grpc(exporter, rt)
            }
        };
        match &mut kind {
            Self::Http(e) => e.set_resource(resource),
            #[cfg(feature = "grpc")]
            Self::Grpc(e, _) => e.set_resource(resource),
        }
        Ok(kind)
    }

    fn export(&self, batch: Vec<SpanData>) -> Result<(), String> {
        let result = match self {
            Self::Http(e) => futures::executor::block_on(e.export(batch)),
            #[cfg(feature = "grpc")]
            Self::Grpc(e, rt) => rt.block_on(e.export(batch)),
        };
        result.map_err(|e| e.to_string())
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Http(e) => e.shutdown(),
            #[cfg(feature = "grpc")]
            Self::Grpc(e, _) => e.shutdown(),
        };
    }
}

/// The export thread: takes batches off the queue and sends them.
struct Worker {
    queue: Arc<Queue>,
    exporter: SpanExporterKind,
    delay: Duration,
    dropped: Arc<AtomicU64>,
    exported: Arc<AtomicU64>,
    warned: AtomicBool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Worker {
    fn run(self) {
        // Best effort: where it cannot be lowered, it runs as it is.
        let _ = thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
        let q = &self.queue;
        loop {
            // Waits until a batch is full, a flush is asked for, the delay
            // has passed with spans waiting, or it is told to stop.
            let (batch, flush, stop) = {
                let mut state = q.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let flush = state.flush_asked > state.flush_done;
                    if state.stop || flush || state.spans.len() >= q.batch {
                        break;
                    }
                    // The delay runs from when the oldest span was queued.
                    let waited = state.since.map(|t| t.elapsed());
                    if !state.spans.is_empty() && waited.is_some_and(|w| w >= self.delay) {
                        break;
                    }
                    let wait = match waited {
                        Some(w) if !state.spans.is_empty() => self.delay.saturating_sub(w),
                        _ => Duration::from_secs(3600),
                    };
                    state = q.ready.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
                }
                let flush = state.flush_asked > state.flush_done;
                let n = if flush || state.stop { state.spans.len() } else { state.spans.len().min(q.batch) };
                let batch: Vec<Span> = state.spans.drain(..n).collect();
                // What is left waits from now.
                state.since = (!state.spans.is_empty()).then(Instant::now);
                (batch, flush.then_some(state.flush_asked), state.stop)
            };
            for chunk in batch.chunks(q.batch.max(1)) {
                self.send(chunk.to_vec());
            }
            if let Some(done) = flush {
                let mut state = q.state.lock().unwrap_or_else(|p| p.into_inner());
                state.flush_done = state.flush_done.max(done);
                q.flushed.notify_all();
            }
            if stop {
                self.exporter.shutdown();
                return;
            }
        }
    }

    fn send(&self, batch: Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        match self.exporter.export(batch.into_iter().map(span_data).collect()) {
            Ok(()) => {
                self.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.dropped_spans(n);
                }
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, spans = n, "exporting spans failed; they are dropped (counted in switchyard_spans_dropped)");
                } else {
                    tracing::debug!(error = %e, spans = n, "exporting spans failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_junk() {
        let c = SpanContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let unsampled = SpanContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // A later version with extra fields is read as 00.
        assert!(SpanContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_ok());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(SpanContext::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let t = [7u8; 16];
        assert_eq!(derived_span_id(&t, &["run", "a"]), derived_span_id(&t, &["run", "a"]));
        assert_ne!(derived_span_id(&t, &["run", "a"]), derived_span_id(&t, &["run", "b"]));
        // Parts are length-prefixed: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(derived_span_id(&t, &["ab", "c"]), derived_span_id(&t, &["a", "bc"]));
        assert_ne!(derived_span_id(&[8u8; 16], &["run", "a"]), derived_span_id(&t, &["run", "a"]));
    }

    #[test]
    fn span_ids_of_a_run_are_distinct_and_stable() {
        let ids = SpanIds::new(&[3; 16], "run-1");
        assert_eq!(ids, SpanIds::new(&[3; 16], "run-1"));
        assert_ne!(ids.id(1, 2, 3, 4), SpanIds::new(&[3; 16], "run-2").id(1, 2, 3, 4));
        let mut seen = std::collections::HashSet::new();
        for tag in 0..4 {
            for a in 0..30 {
                for b in 0..30 {
                    for c in 0..5 {
                        assert!(seen.insert(ids.id(tag, a, b, c)), "{tag} {a} {b} {c}");
                    }
                }
            }
        }
        assert!(!seen.contains(&[0u8; 8]));
    }

    #[test]
    fn disabled_telemetry_samples_nothing_and_drops_nothing() {
        let t = Telemetry::disabled();
        assert!(!t.is_tracing());
        assert!(!t.sampled([1; 16], None));
        t.emit(Span {
            context: SpanContext { trace_id: [1; 16], span_id: [2; 8], sampled: true },
            parent: None,
            parent_remote: false,
            kind: Kind::Internal,
            name: "x".into(),
            start_ms: 0,
            end_ms: 1,
            attributes: vec![],
            error: None,
            links: vec![],
        });
        assert_eq!(t.dropped_spans(), 0);
    }
}
