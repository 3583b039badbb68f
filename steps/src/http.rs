//! The HTTP port used by the `http` step. The adapter (reqwest, with timeouts
//! and, later, an SSRF guard) lives in `switchyard-integrations`.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum HttpBody {
    Json(Value),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub body: Option<HttpBody>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("response too large: {0}")]
    TooLarge(String),
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait HttpClient: Send + Sync {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError>;
}

/// An HTTP port that refuses every request: for work that must not reach
/// the network (the benchmark, unit tests, fuzzing).
pub struct Offline;

#[async_trait]
impl HttpClient for Offline {
    async fn send(&self, _request: HttpRequest) -> Result<HttpResponse, HttpError> {
        Err(HttpError::Invalid("this engine makes no HTTP requests".into()))
    }
}
