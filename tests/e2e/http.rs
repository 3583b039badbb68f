//! The HTTP adapter against real local servers: redirects are followed by
//! hand, credentials stay with their origin, and URLs in errors are redacted.
//! Two [`CounterServer`]s on different ports are two origins.

use std::time::Duration;

use reqwest::Url;
use serde_json::{Value, json};
use switchyard_integrations::http::ReqwestHttp;
use switchyard_steps::http::{HttpBody, HttpClient, HttpError, HttpRequest, HttpResponse};
use switchyard_tests::{Call, CounterServer};

const SECRET_HEADERS: [(&str, &str); 3] =
    [("X-Api-Key", "key-1"), ("Authorization", "Bearer token-1"), ("Idempotency-Key", "run-1/fetch")];

/// `{server}/hit/{name}` with `query` added, each value URL-encoded.
fn url(server: &CounterServer, name: &str, query: &[(&str, &str)]) -> String {
    let mut url = Url::parse(&server.url(&format!("/hit/{name}"))).expect("counter URL");
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url.into()
}

fn request(method: &str, url: String, body: Option<Value>) -> HttpRequest {
    HttpRequest {
        method: method.to_owned(),
        url,
        headers: SECRET_HEADERS.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())).collect(),
        query: Vec::new(),
        body: body.map(HttpBody::Json),
        // A failure deadline, not a wait: every reply is expected promptly.
        timeout: Duration::from_secs(10),
    }
}

async fn send(request: HttpRequest) -> Result<HttpResponse, HttpError> {
    switchyard_tests::install_crypto_provider();
    ReqwestHttp::new().expect("http client").send(request).await
}

fn only_call(server: &CounterServer, name: &str) -> Call {
    let calls = server.calls_to(name);
    assert_eq!(calls.len(), 1, "calls to {name}: {calls:?}");
    calls.into_iter().next().unwrap()
}

/// A port nothing listens on: bound once, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

#[tokio::test]
async fn a_redirect_within_the_origin_keeps_every_header() {
    let server = CounterServer::start().await;
    for (name, to) in [("absolute", server.url("/hit/end-absolute")), ("relative", "/hit/end-relative".to_owned())] {
        let response = send(request("GET", url(&server, name, &[("redirect_to", &to)]), None)).await.unwrap();
        assert_eq!(response.status, 200, "{name}");
        let end = only_call(&server, &format!("end-{name}"));
        for (header, value) in SECRET_HEADERS {
            assert_eq!(end.headers.get(&header.to_ascii_lowercase()).map(String::as_str), Some(value), "{name}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_redirect_to_another_origin_drops_credentials_for_good() {
    let (a, b) = (CounterServer::start().await, CounterServer::start().await);
    // a -> b -> back to a: headers dropped on the way out stay dropped, and no
    // `Referer` (reqwest's own redirects send one, query included) is added.
    let back = a.url("/hit/back");
    let mut request =
        request("GET", url(&a, "start", &[("redirect_to", &url(&b, "away", &[("redirect_to", &back)]))]), None);
    request.headers.push(("Accept".to_owned(), "application/json".to_owned()));
    request.headers.push(("X-Trace".to_owned(), "t-1".to_owned()));
    let response = send(request).await.unwrap();
    assert_eq!(response.status, 200);

    let start = only_call(&a, "start");
    assert_eq!(start.headers.get("x-api-key").map(String::as_str), Some("key-1"));
    for call in [only_call(&b, "away"), only_call(&a, "back")] {
        for dropped in ["x-api-key", "authorization", "x-trace", "referer"] {
            assert!(!call.headers.contains_key(dropped), "{} still has {dropped}: {:?}", call.name, call.headers);
        }
        assert_eq!(call.idempotency_key.as_deref(), Some("run-1/fetch"), "{}", call.name);
        assert_eq!(call.headers.get("accept").map(String::as_str), Some("application/json"), "{}", call.name);
        assert!(call.headers["user-agent"].starts_with("switchyard/"), "{}", call.name);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redirects_after_a_post_follow_the_status() {
    let (a, b) = (CounterServer::start().await, CounterServer::start().await);
    for (status, method, kept) in [
        ("301", "GET", false),
        ("302", "GET", false),
        ("303", "GET", false),
        ("307", "POST", true),
        ("308", "POST", true),
    ] {
        for (origin, target) in [("same", &a), ("other", &b)] {
            let name = format!("to-{status}-{origin}");
            let to = url(target, &name, &[]);
            let from =
                url(&a, &format!("from-{status}-{origin}"), &[("redirect_to", &to), ("redirect_status", status)]);
            let response = send(request("POST", from, Some(json!({"n": 1})))).await.unwrap();
            assert_eq!(response.status, 200, "{name}");

            let call = only_call(target, &name);
            assert_eq!(call.method, method, "{name}");
            let (body, content_type) =
                if kept { (json!({"n": 1}), Some("application/json")) } else { (Value::Null, None) };
            assert_eq!(call.body, body, "{name}");
            assert_eq!(call.headers.get("content-type").map(String::as_str), content_type, "{name}");
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_redirect_loop_fails_after_ten_hops() {
    let server = CounterServer::start().await;
    let error = send(request("GET", url(&server, "loop", &[("redirect_status", "302")]), None)).await.unwrap_err();
    let HttpError::Other(message) = &error else { panic!("unexpected {error:?}") };
    assert!(message.contains("too many redirects"), "{message}");
    assert!(!message.contains("redirect_status"), "the query leaked: {message}");
    // The first request and ten redirects.
    assert_eq!(server.count("loop"), 11);
    server.stop().await;
}

#[tokio::test]
async fn connection_errors_do_not_show_the_query() {
    let server = CounterServer::start().await;
    let target = format!("http://127.0.0.1:{}/p?token=SECRET", closed_port());
    let redirected = url(&server, "start", &[("redirect_to", &target)]);
    for url in [target.clone(), redirected] {
        let error = send(request("GET", url, None)).await.unwrap_err();
        let HttpError::Connect(message) = &error else { panic!("unexpected {error:?}") };
        assert!(message.contains("/p?…"), "{message}");
        assert!(!error.to_string().contains("SECRET"), "{error}");
    }
    // Refused before any connection: the message still names a redacted URL.
    let error = send(request("GET", "ftp://user:pw@127.0.0.1/p?token=SECRET".to_owned(), None)).await.unwrap_err();
    assert!(matches!(error, HttpError::Invalid(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("ftp://127.0.0.1/p?…"), "{message}");
    assert!(!message.contains("SECRET") && !message.contains("pw"), "{message}");
    server.stop().await;
}

#[tokio::test]
async fn a_redirect_to_a_file_url_is_refused() {
    let server = CounterServer::start().await;
    let error =
        send(request("GET", url(&server, "start", &[("redirect_to", "file:///etc/passwd")]), None)).await.unwrap_err();
    let HttpError::Invalid(message) = &error else { panic!("unexpected {error:?}") };
    assert!(message.contains("redirect to file:///etc/passwd") && message.contains("only http and https"), "{message}");
    assert_eq!(server.calls().len(), 1);
    server.stop().await;
}
