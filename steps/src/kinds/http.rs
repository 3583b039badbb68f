use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::http::{HttpBody, HttpClient, HttpError, HttpRequest};
use crate::{ConfigIssue, Step, StepContext, StepError, StepResult};

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// `http`: one request. Output `{status, headers, body}` with `body` parsed
/// when the response is JSON. Non-2xx responses fail the attempt; 429, 5xx,
/// timeouts and connection errors are retryable. Sends the step's idempotency
/// key as `Idempotency-Key` unless the workflow sets that header itself.
/// Redirects are the client's business (the reqwest adapter follows up to 10
/// and keeps credentials with their origin); adapter errors arrive with URLs
/// already redacted and are passed on as they are.
pub struct Http {
    client: Arc<dyn HttpClient>,
}

impl Http {
    pub fn new(client: Arc<dyn HttpClient>) -> Self {
        Self { client }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_method")]
    pub method: String,
    pub url: String,
    /// Values may be strings, numbers or booleans.
    #[serde(default, deserialize_with = "scalars")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "scalars")]
    pub query: BTreeMap<String, String>,
    /// A JSON body (sent with `Content-Type: application/json`).
    #[serde(default)]
    pub json: Option<Value>,
    /// A text body.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default = "default_timeout", deserialize_with = "crate::duration::de")]
    pub timeout: Duration,
}

/// A map whose values are scalars, kept as text (`{page: 2}` -> `"2"`).
fn scalars<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            Value::Number(n) => Ok((k, n.to_string())),
            Value::Bool(b) => Ok((k, b.to_string())),
            other => Err(serde::de::Error::custom(format!("{k}: expected a string, number or boolean, got {other}"))),
        })
        .collect()
}

fn default_method() -> String {
    "GET".to_owned()
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Step for Http {
    const KIND: &'static str = "http";
    type Config = HttpConfig;
    type Output = Value;

    fn check(config: &HttpConfig) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if !METHODS.contains(&config.method.to_ascii_uppercase().as_str()) {
            issues.push(ConfigIssue::new(
                "method",
                format!("unknown method {:?}; use one of {}", config.method, METHODS.join(", ")),
            ));
        }
        if config.json.is_some() && config.body.is_some() {
            issues.push(ConfigIssue::new("", "set `json` or `body`, not both"));
        }
        if config.url.trim().is_empty() {
            issues.push(ConfigIssue::new("url", "must not be empty"));
        }
        issues
    }

    async fn run(&self, config: HttpConfig, ctx: &mut StepContext) -> StepResult {
        let mut headers: Vec<(String, String)> = config.headers.into_iter().collect();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("idempotency-key")) {
            headers.push(("Idempotency-Key".to_owned(), ctx.idempotency_key().to_owned()));
        }
        if let Some(tp) = ctx.traceparent()
            && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
        {
            headers.push(("traceparent".to_owned(), tp));
        }
        let body = match (config.json, config.body) {
            (Some(json), _) => Some(HttpBody::Json(json)),
            (None, Some(text)) => Some(HttpBody::Text(text)),
            (None, None) => None,
        };
        let request = HttpRequest {
            method: config.method.to_ascii_uppercase(),
            url: config.url,
            headers,
            query: config.query.into_iter().collect(),
            body,
            timeout: config.timeout,
        };
        let response = self.client.send(request).await.map_err(|e| match e {
            HttpError::Invalid(m) => StepError::fatal("http_invalid", m),
            HttpError::Connect(m) => StepError::retryable("http_connect", m),
            HttpError::Timeout(d) => StepError::retryable("http_timeout", format!("no response within {d:?}")),
            HttpError::TooLarge(m) => StepError::fatal("http_too_large", m),
            HttpError::Other(m) => StepError::retryable("http_error", m),
        })?;

        let is_json = response
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.to_ascii_lowercase().contains("json"));
        let body = if is_json {
            serde_json::from_slice(&response.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into_owned()))
        } else {
            Value::String(String::from_utf8_lossy(&response.body).into_owned())
        };
        let status = response.status;
        if !(200..300).contains(&status) {
            let mut snippet = match &body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if snippet.len() > 300 {
                let mut cut = 300;
                while !snippet.is_char_boundary(cut) {
                    cut -= 1;
                }
                snippet.truncate(cut);
                snippet.push('…');
            }
            let message = format!("HTTP {status}: {snippet}");
            let code = format!("http_{status}");
            let retryable = status == 429 || status >= 500;
            return Err(StepError { code, message, retryable }.into());
        }
        let headers: Map<String, Value> =
            response.headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v))).collect();
        Ok(json!({ "status": status, "headers": headers, "body": body }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::context::testing::{MemorySink, context};
    use crate::http::HttpResponse;
    use crate::{DynStep, Stop};
    use async_trait::async_trait;
    use std::sync::Mutex;

    struct Canned {
        status: u16,
        seen: Mutex<Vec<HttpRequest>>,
    }

    #[async_trait]
    impl HttpClient for Canned {
        async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
            self.seen.lock().unwrap().push(request);
            Ok(HttpResponse {
                status: self.status,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: br#"{"ok":true}"#.to_vec(),
            })
        }
    }

    async fn call(status: u16) -> (StepResult, Vec<HttpRequest>) {
        let client = Arc::new(Canned { status, seen: Mutex::new(Vec::new()) });
        let step = Http::new(client.clone());
        let mut ctx = context(Arc::new(ManualClock::new(0)), Arc::new(MemorySink::default()));
        let result =
            DynStep::run(&step, json!({"url": "http://127.0.0.1:1/x", "method": "post", "json": {"a": 1}}), &mut ctx)
                .await;
        let seen = client.seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn parses_json_and_sends_the_idempotency_key() {
        let (result, seen) = call(200).await;
        let out = result.unwrap();
        assert_eq!(out["status"], 200);
        assert_eq!(out["body"]["ok"], true);
        assert_eq!(seen[0].method, "POST");
        assert!(seen[0].headers.contains(&("Idempotency-Key".into(), "run1/s".into())));
    }

    #[tokio::test]
    async fn classifies_status_codes() {
        for (status, retryable) in [(404, false), (429, true), (503, true)] {
            let (result, _) = call(status).await;
            match result.unwrap_err() {
                Stop::Error(e) => {
                    assert_eq!(e.retryable, retryable, "status {status}");
                    assert_eq!(e.code, format!("http_{status}"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    struct Failing(HttpError);

    #[async_trait]
    impl HttpClient for Failing {
        async fn send(&self, _: HttpRequest) -> Result<HttpResponse, HttpError> {
            Err(self.0.clone())
        }
    }

    #[tokio::test]
    async fn classifies_client_errors() {
        for (error, code, retryable) in [
            (HttpError::Invalid("m".into()), "http_invalid", false),
            (HttpError::Connect("m".into()), "http_connect", true),
            (HttpError::Timeout(Duration::from_secs(1)), "http_timeout", true),
            // Retrying cannot shrink a body.
            (HttpError::TooLarge("m".into()), "http_too_large", false),
            (HttpError::Other("m".into()), "http_error", true),
        ] {
            let step = Http::new(Arc::new(Failing(error)));
            let mut ctx = context(Arc::new(ManualClock::new(0)), Arc::new(MemorySink::default()));
            match DynStep::run(&step, json!({"url": "http://127.0.0.1:1/x"}), &mut ctx).await.unwrap_err() {
                Stop::Error(e) => assert_eq!((e.code.as_str(), e.retryable), (code, retryable)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let step = Http::new(Arc::new(Canned { status: 200, seen: Mutex::new(Vec::new()) }));
        let issues = DynStep::check(&step, &json!({"url": "x", "method": "FETCH", "json": 1, "body": "b"}));
        assert_eq!(issues.len(), 2);
        let issues = DynStep::check(&step, &json!({"url": "x", "timeout": "soon"}));
        assert!(issues[0].message.contains("invalid duration"), "{issues:?}");
        assert_eq!(issues[0].path, "timeout");
        assert!(DynStep::check(&step, &json!({"url": "x", "query": {"page": 2, "all": true}})).is_empty());
        assert_eq!(DynStep::check(&step, &json!({"url": "x", "query": {"q": [1]}}))[0].path, "query");
        let issues = DynStep::check(&step, &json!({"uri": "x"}));
        assert!(issues[0].message.contains("unknown field"), "{issues:?}");
    }
}
