//! The HTTP adapter: reqwest with a whole-request timeout.
//!
//! Redirects are followed here, not by reqwest, so that every hop is decided
//! in one place: [`admit`] gates each target before it is connected to, and
//! [`redirect`] turns a 3xx response into the next hop, dropping credentials
//! on the way to another origin. URLs reach error messages only through
//! [`redact`], because tokens travel in query strings.

use std::error::Error as _;
use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use switchyard_steps::http::{HttpBody, HttpClient, HttpError, HttpRequest, HttpResponse};

/// Largest response body kept in a step output.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Most redirects followed for one request; one more is an error.
const MAX_REDIRECTS: usize = 10;

/// The request headers kept on a redirect to another origin (plus
/// `content-type` when the body is kept); every other header, such as
/// `Authorization`, `Cookie` or `X-Api-Key`, is dropped.
const CROSS_ORIGIN_SAFE: [&str; 5] = ["accept", "accept-language", "content-language", "user-agent", "idempotency-key"];

/// Headers that describe a body, dropped with it when a redirect turns the
/// request into a GET.
const BODY_HEADERS: [&str; 6] =
    ["content-type", "content-length", "content-encoding", "content-language", "content-location", "transfer-encoding"];

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
            // `send` follows redirects itself; see `redirect`.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HttpError::Other(format!("building HTTP client: {e}")))?;
        Ok(Self { client })
    }

    /// The underlying client (rustls with ring, no redirects followed), for
    /// adapters that speak HTTP through a library, like the model adapter.
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Sends `hop` and every redirect it leads to, up to [`MAX_REDIRECTS`].
    async fn follow(&self, mut hop: Hop, timeout: Duration) -> Result<HttpResponse, HttpError> {
        let mut redirects = 0;
        loop {
            if let Err(why) = admit(&hop.url) {
                let what = if redirects == 0 { "url" } else { "redirect to" };
                return Err(HttpError::Invalid(format!("{what} {}: {why}", redact(&hop.url))));
            }
            let response = self.exchange(&hop).await.map_err(|e| classify(e, &hop.url, timeout))?;
            let Some(next) = redirect(&hop, response.status(), response.headers())? else {
                return read(response, &hop.url, timeout).await;
            };
            if redirects == MAX_REDIRECTS {
                let last = redact(&hop.url);
                return Err(HttpError::Other(format!(
                    "too many redirects (more than {MAX_REDIRECTS}), the last from {last}"
                )));
            }
            redirects += 1;
            hop = next;
        }
    }

    async fn exchange(&self, hop: &Hop) -> Result<reqwest::Response, reqwest::Error> {
        let mut builder = self.client.request(hop.method.clone(), hop.url.clone()).headers(hop.headers.clone());
        if let Some(body) = &hop.body {
            builder = builder.body(body.clone());
        }
        builder.send().await
    }
}

#[async_trait]
impl HttpClient for ReqwestHttp {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let timeout = request.timeout;
        let first = Hop::parse(request)?;
        // The timeout covers every hop and the body, like reqwest's own.
        tokio::time::timeout(timeout, self.follow(first, timeout)).await.unwrap_or(Err(HttpError::Timeout(timeout)))
    }
}

/// One request as it goes out; a redirect makes the next one.
struct Hop {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

impl Hop {
    fn parse(request: HttpRequest) -> Result<Self, HttpError> {
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| HttpError::Invalid(format!("method {:?}", request.method)))?;
        // The text is not quoted: it may hold a token and did not parse, so
        // it cannot be redacted.
        let mut url = Url::parse(&request.url).map_err(|e| HttpError::Invalid(format!("url: {e}")))?;
        if !request.query.is_empty() {
            url.query_pairs_mut().extend_pairs(request.query.iter());
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpError::Invalid(format!("header {name:?}: not a valid header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| HttpError::Invalid(format!("header {name}: the value is not a valid header value")))?;
            headers.append(name, value);
        }
        let body = match request.body {
            Some(HttpBody::Json(json)) => {
                headers.append(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Some(serde_json::to_vec(&json).map_err(|e| HttpError::Invalid(e.to_string()))?)
            }
            Some(HttpBody::Text(text)) => Some(text.into_bytes()),
            None => None,
        };
        Ok(Self { method, url, headers, body })
    }
}

/// Whether a request may go to `url`; checked for every hop, the first and
/// each redirect, before connecting. The outbound (SSRF) guard belongs here.
fn admit(url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err("only http and https are allowed".to_owned());
    }
    Ok(())
}

/// The hop a response redirects to, or `None` when it is the answer.
///
/// 301, 302 and 303 turn the request into a body-less GET (301 and 302 leave
/// GET and HEAD alone); 307 and 308 keep method and body. A hop to another
/// origin keeps only the [`CROSS_ORIGIN_SAFE`] headers. A 3xx without a
/// `Location` is returned as it is.
fn redirect(hop: &Hop, status: StatusCode, headers: &HeaderMap) -> Result<Option<Hop>, HttpError> {
    let keeps_method = match status.as_u16() {
        301 | 302 => matches!(hop.method, Method::GET | Method::HEAD),
        303 => false,
        307 | 308 => true,
        _ => return Ok(None),
    };
    let Some(location) = headers.get(header::LOCATION) else {
        return Ok(None);
    };
    let invalid = |why: String| HttpError::Invalid(format!("redirect from {}: {why}", redact(&hop.url)));
    let location = location.to_str().map_err(|_| invalid("the Location header is not text".to_owned()))?;
    let url = hop.url.join(location).map_err(|e| invalid(format!("invalid Location: {e}")))?;

    let mut headers = hop.headers.clone();
    let (method, body) = if keeps_method {
        (hop.method.clone(), hop.body.clone())
    } else {
        for name in BODY_HEADERS {
            headers.remove(name);
        }
        (Method::GET, None)
    };
    if url.origin() != hop.url.origin() {
        let keep = |name: &HeaderName| {
            CROSS_ORIGIN_SAFE.contains(&name.as_str()) || (name == header::CONTENT_TYPE && body.is_some())
        };
        let dropped: Vec<HeaderName> = headers.keys().filter(|name| !keep(name)).cloned().collect();
        for name in dropped {
            headers.remove(name);
        }
    }
    Ok(Some(Hop { method, url, headers, body }))
}

async fn read(mut response: reqwest::Response, url: &Url, timeout: Duration) -> Result<HttpResponse, HttpError> {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(e, url, timeout))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpError::TooLarge(format!("the body exceeds {MAX_BODY} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpResponse { status, headers, body })
}

/// Sorts a reqwest error; its message names `url` only in redacted form.
fn classify(e: reqwest::Error, url: &Url, timeout: Duration) -> HttpError {
    if e.is_timeout() {
        return HttpError::Timeout(timeout);
    }
    let (connect, builder) = (e.is_connect(), e.is_builder());
    let e = e.without_url();
    let mut message = format!("{e} for {}", redact(url));
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    if connect {
        HttpError::Connect(message)
    } else if builder {
        HttpError::Invalid(message)
    } else {
        HttpError::Other(message)
    }
}

/// `url` fit for an error message: `scheme://host[:port]/path`, without
/// userinfo or fragment, and with a query shown as `?…`.
fn redact(url: &Url) -> String {
    if url.cannot_be_a_base() {
        // `mailto:`, `data:` and the like: everything after the scheme is payload.
        return format!("{}:…", url.scheme());
    }
    let mut out = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        let _ = write!(out, ":{port}");
    }
    out.push_str(url.path());
    if url.query().is_some() {
        out.push_str("?…");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_keeps_scheme_host_port_and_path_only() {
        for (url, expected) in [
            ("http://127.0.0.1:8080/p?token=SECRET", "http://127.0.0.1:8080/p?…"),
            ("https://user:pw@example.com/a/b#frag", "https://example.com/a/b"),
            ("https://example.com:443/?", "https://example.com/?…"),
            ("http://[::1]:9/x", "http://[::1]:9/x"),
            ("file:///etc/passwd", "file:///etc/passwd"),
            ("data:text/plain,SECRET", "data:…"),
        ] {
            assert_eq!(redact(&Url::parse(url).unwrap()), expected, "{url}");
        }
    }

    fn hop(method: Method, url: &str, body: Option<&str>) -> Hop {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-api-key", "k"),
            ("authorization", "Bearer t"),
            ("idempotency-key", "r/s"),
            ("content-type", "text/plain"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        Hop { method, url: Url::parse(url).unwrap(), headers, body: body.map(|b| b.as_bytes().to_vec()) }
    }

    fn location(to: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::LOCATION, HeaderValue::from_str(to).unwrap());
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn redirect_resolves_relative_locations_and_keeps_same_origin_headers() {
        let from = hop(Method::GET, "http://h:1/a/b?q=1", None);
        let next = redirect(&from, StatusCode::FOUND, &location("c?d=2")).unwrap().unwrap();
        assert_eq!(next.url.as_str(), "http://h:1/a/c?d=2");
        assert_eq!(names(&next.headers), ["authorization", "content-type", "idempotency-key", "x-api-key"]);
    }

    #[test]
    fn redirect_to_another_origin_keeps_only_safe_headers() {
        for (status, expected) in [
            (StatusCode::TEMPORARY_REDIRECT, &["content-type", "idempotency-key"][..]),
            (StatusCode::SEE_OTHER, &["idempotency-key"][..]),
        ] {
            let from = hop(Method::POST, "http://h:1/", Some("x"));
            for to in ["http://h:2/", "https://h:1/", "http://other:1/"] {
                let next = redirect(&from, status, &location(to)).unwrap().unwrap();
                assert_eq!(names(&next.headers), expected, "{status} to {to}");
            }
        }
    }

    #[test]
    fn redirect_changes_method_by_status() {
        for (status, method, expected, keeps_body) in [
            (301, Method::POST, Method::GET, false),
            (302, Method::PUT, Method::GET, false),
            (302, Method::HEAD, Method::HEAD, false),
            (303, Method::POST, Method::GET, false),
            (307, Method::POST, Method::POST, true),
            (308, Method::PATCH, Method::PATCH, true),
        ] {
            let body = (method != Method::HEAD).then_some("x");
            let from = hop(method, "http://h/", body);
            let status = StatusCode::from_u16(status).unwrap();
            let next = redirect(&from, status, &location("/next")).unwrap().unwrap();
            assert_eq!(next.method, expected, "{status}");
            assert_eq!(next.body.is_some(), keeps_body, "{status}");
        }
    }

    #[test]
    fn other_statuses_and_missing_locations_are_answers() {
        let from = hop(Method::GET, "http://h/", None);
        assert!(redirect(&from, StatusCode::NOT_MODIFIED, &location("/x")).unwrap().is_none());
        assert!(redirect(&from, StatusCode::FOUND, &HeaderMap::new()).unwrap().is_none());
    }

    #[test]
    fn admit_refuses_other_schemes() {
        assert!(admit(&Url::parse("https://h/").unwrap()).is_ok());
        assert!(admit(&Url::parse("file:///etc/passwd").unwrap()).is_err());
    }
}
