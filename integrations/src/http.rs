//! The HTTP adapter: reqwest with per-request timeouts.

use std::time::Duration;

use async_trait::async_trait;
use switchyard_steps::http::{HttpBody, HttpClient, HttpError, HttpRequest, HttpResponse};

/// Largest response body kept in a step output.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct ReqwestHttp {
    client: reqwest::Client,
}

impl ReqwestHttp {
    pub fn new() -> Result<Self, HttpError> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| HttpError::Other(format!("building HTTP client: {e}")))?;
        Ok(Self { client })
    }
}

#[async_trait]
impl HttpClient for ReqwestHttp {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| HttpError::Invalid(format!("method {:?}", request.method)))?;
        let mut url =
            reqwest::Url::parse(&request.url).map_err(|e| HttpError::Invalid(format!("url {:?}: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpError::Invalid(format!("url {:?}: only http and https are allowed", request.url)));
        }
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(request.query.iter());
        }
        let mut builder = self.client.request(method, url).timeout(request.timeout);
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = match request.body {
            Some(HttpBody::Json(json)) => builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&json).map_err(|e| HttpError::Invalid(e.to_string()))?),
            Some(HttpBody::Text(text)) => builder.body(text),
            None => builder,
        };
        let timeout = request.timeout;
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                HttpError::Timeout(timeout)
            } else if e.is_connect() {
                HttpError::Connect(e.to_string())
            } else if e.is_builder() {
                HttpError::Invalid(e.to_string())
            } else {
                HttpError::Other(e.to_string())
            }
        };
        let mut response = builder.send().await.map_err(classify)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(HttpError::TooLarge(format!("the body exceeds {MAX_BODY} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, headers, body })
    }
}
