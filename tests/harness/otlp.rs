//! A real OTLP/HTTP receiver on 127.0.0.1: decodes the protobuf
//! `ExportTraceServiceRequest`s and `ExportMetricsServiceRequest`s that
//! OpenTelemetry exporters POST to `/v1/traces` and `/v1/metrics`, with the
//! generated types of the `opentelemetry-proto` crate, and keeps what came.
//! With the `grpc` feature, [`OtlpReceiver::start_grpc`] takes the same
//! requests over OTLP/gRPC (the crate's generated tonic services).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use tokio::sync::watch;

use crate::serve::{Served, wait_until};

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub name: String,
    /// 1 internal, 2 server, 3 client (the OTLP enum).
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Attribute values as text (arrays joined with `,`).
    pub attributes: BTreeMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// The status description.
    pub status_message: String,
    /// `(trace id, span id)` of each link.
    pub links: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Received {
    pub spans: Vec<ReceivedSpan>,
    /// Names of the metrics received.
    pub metrics: Vec<String>,
    /// Export requests received, of either kind.
    pub requests: usize,
}

/// The receiver; stopped by [`OtlpReceiver::stop`] or when dropped.
pub struct OtlpReceiver {
    served: Served,
    state: Arc<watch::Sender<Received>>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let state = Arc::new(watch::Sender::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/metrics", post(metrics))
            .with_state(state.clone());
        Self { served: Served::start(app).await, state }
    }

    /// A receiver speaking OTLP/gRPC (HTTP/2 without TLS) on 127.0.0.1.
    #[cfg(feature = "grpc")]
    pub async fn start_grpc() -> Self {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let state = Arc::new(watch::Sender::new(Received::default()));
        let app = Router::new()
            .route_service(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                TraceServiceServer::new(Grpc(state.clone())),
            )
            .route_service(
                "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                MetricsServiceServer::new(Grpc(state.clone())),
            );
        Self { served: Served::start(app).await, state }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.served.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.borrow().spans.clone()
    }

    pub fn received(&self) -> Received {
        self.state.borrow().clone()
    }

    /// Waits until `done` holds for what was received.
    pub async fn wait_until(&self, done: impl FnMut(&Received) -> bool) {
        wait_until(&self.state, done).await;
    }

    pub async fn stop(mut self) {
        self.served.shut_down();
        self.served.join().await;
    }
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::IntValue(n)) => n.to_string(),
        Some(Any::DoubleValue(n)) => n.to_string(),
        Some(Any::ArrayValue(a)) => a.values.iter().map(|v| text(&Some(v.clone()))).collect::<Vec<_>>().join(","),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(state): State<Arc<watch::Sender<Received>>>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else { return StatusCode::BAD_REQUEST };
    record_traces(&state, request);
    StatusCode::OK
}

fn record_traces(state: &watch::Sender<Received>, request: ExportTraceServiceRequest) {
    let mut spans = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attributes(&s.attributes),
                    status: s.status.as_ref().map_or(0, |st| st.code),
                    status_message: s.status.map(|st| st.message).unwrap_or_default(),
                    links: s.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                });
            }
        }
    }
    state.send_modify(|r| {
        r.spans.extend(spans);
        r.requests += 1;
    });
}

async fn metrics(State(state): State<Arc<watch::Sender<Received>>>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportMetricsServiceRequest::decode(body) else { return StatusCode::BAD_REQUEST };
    record_metrics(&state, &request);
    StatusCode::OK
}

fn record_metrics(state: &watch::Sender<Received>, request: &ExportMetricsServiceRequest) {
    let names: Vec<String> = request
        .resource_metrics
        .iter()
        .flat_map(|rm| rm.scope_metrics.iter())
        .flat_map(|sm| sm.metrics.iter().map(|m| m.name.clone()))
        .collect();
    state.send_modify(|r| {
        r.metrics.extend(names);
        r.requests += 1;
    });
}

/// The OTLP/gRPC services, recording into the same state.
#[cfg(feature = "grpc")]
struct Grpc(Arc<watch::Sender<Received>>);

#[cfg(feature = "grpc")]
#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        record_traces(&self.0, request.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

#[cfg(feature = "grpc")]
#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse>,
        tonic::Status,
    > {
        record_metrics(&self.0, &request.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}
