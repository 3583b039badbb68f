//! Exercises [`CounterServer`] through a real client over a real socket.

use std::future::Future;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::*;

/// A failure deadline, not a wait: every awaited event is expected promptly.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future).await.expect("timed out after 10 s")
}

fn client() -> reqwest::Client {
    switchyard_integrations::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().expect("build reqwest client")
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = within(request.send()).await.expect("request failed");
    let status = response.status().as_u16();
    let text = within(response.text()).await.expect("read body");
    (status, serde_json::from_str(&text).expect("JSON reply"))
}

async fn get(url: String) -> (u16, Value) {
    send(client().get(url)).await
}

#[tokio::test]
async fn counts_echoes_and_records_calls() {
    let server = CounterServer::start().await;
    let http = client();
    for expected in 1..=2 {
        let request = http
            .post(server.url("/hit/a?x=1&y=two"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", format!("key-{expected}"))
            .body(r#"{"hello":"world"}"#);
        let (status, body) = send(request).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({
                "name": "a",
                "count": expected,
                "echo": {"hello": "world"},
                "query": {"x": "1", "y": "two"},
            })
        );
    }
    let (status, body) = get(server.url("/hit/b")).await;
    assert_eq!((status, &body["count"], &body["echo"]), (200, &json!(1), &Value::Null));
    let (_, body) = send(http.put(server.url("/hit/b")).body("not json")).await;
    assert_eq!((&body["count"], &body["echo"]), (&json!(2), &Value::Null));

    assert_eq!((server.count("a"), server.count("b"), server.count("c")), (2, 2, 0));
    let calls = server.calls();
    let order: Vec<_> = calls.iter().map(|c| (c.name.as_str(), c.method.as_str())).collect();
    assert_eq!(order, [("a", "POST"), ("a", "POST"), ("b", "GET"), ("b", "PUT")]);
    let a = server.calls_to("a");
    assert_eq!(a.len(), 2);
    assert_eq!(a[1].idempotency_key.as_deref(), Some("key-2"));
    assert_eq!(a[1].body, json!({"hello": "world"}));
    assert_eq!(a[1].query.get("y").map(String::as_str), Some("two"));
    let b = server.calls_to("b");
    assert_eq!(b[0].idempotency_key, None);
    assert_eq!(b[0].body, Value::Null);
    assert_eq!(b[1].body, json!("not json"));
    for call in &calls {
        let ended = call.ended_at.expect("answered calls have ended_at");
        assert!(ended >= call.started_at);
    }
    // Sequential calls never overlap.
    assert_eq!(server.max_in_flight(), 1);
    assert_eq!(server.in_flight(), 0);
    server.stop().await;
}

#[tokio::test]
async fn fail_first_then_succeed_and_custom_status() {
    let server = CounterServer::start().await;
    for (n, expected) in [(1, 503), (2, 503), (3, 200)] {
        let (status, body) = get(server.url("/hit/flaky?fail_first=2")).await;
        assert_eq!(status, expected, "call {n}");
        assert_eq!(body["count"], json!(n));
        assert_eq!(body.get("error").is_some(), expected == 503, "call {n}: {body}");
    }

    let (status, body) = get(server.url("/hit/teapot?status=418")).await;
    assert_eq!(status, 418);
    assert_eq!(body["count"], json!(1));
    assert!(body["error"].is_string());

    let (status, body) = get(server.url("/hit/created?status=201")).await;
    assert_eq!((status, &body["name"]), (201, &json!("created")));

    let (status, body) = get(server.url("/hit/bad?delay_ms=soon")).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("delay_ms"), "{body}");
    assert_eq!(server.count("bad"), 1, "bad parameters are still recorded");
}

#[tokio::test]
async fn delay_ms_delays_the_reply() {
    let server = CounterServer::start().await;
    let (status, _) = get(server.url("/hit/slow?delay_ms=30")).await;
    assert_eq!(status, 200);
    let call = &server.calls_to("slow")[0];
    assert!(call.ended_at.unwrap() - call.started_at >= Duration::from_millis(30));
}

#[tokio::test]
async fn hold_first_parks_the_first_call_until_released() {
    let server = CounterServer::start().await;
    let first = tokio::spawn(get(server.url("/hit/h?hold_first=1")));
    within(server.wait_for_held("h")).await;
    assert_eq!(server.in_flight(), 1);

    // Later calls to the same name are not held.
    let (status, body) = get(server.url("/hit/h?hold_first=1")).await;
    assert_eq!((status, &body["count"]), (200, &json!(2)));
    let calls = server.calls_to("h");
    assert!(calls[0].ended_at.is_none(), "first call is still held");
    assert!(!first.is_finished());

    server.release("h");
    let (status, body) = within(first).await.unwrap();
    assert_eq!((status, &body["count"]), (200, &json!(1)));
    within(server.wait_idle()).await;
    assert!(server.calls_to("h")[0].ended_at.is_some());
    assert_eq!(server.max_in_flight(), 2);
}

#[tokio::test]
async fn max_in_flight_counts_overlapping_calls() {
    let server = CounterServer::start().await;
    let names: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    let replies: Vec<_> =
        names.iter().map(|name| tokio::spawn(get(server.url(&format!("/hit/{name}?hold_first=1"))))).collect();
    for name in &names {
        within(server.wait_for_held(name)).await;
    }
    assert_eq!(server.in_flight(), 5);
    assert_eq!(server.max_in_flight(), 5);

    for name in &names {
        server.release(name);
    }
    for reply in replies {
        assert_eq!(within(reply).await.unwrap().0, 200);
    }
    within(server.wait_idle()).await;
    assert_eq!(server.in_flight(), 0);
    assert_eq!(server.max_in_flight(), 5);
    within(server.wait_for_calls("p4", 1)).await;
}

#[tokio::test]
async fn wait_for_calls_resolves_when_count_is_reached() {
    let server = CounterServer::start().await;
    let url = server.url("/hit/w");
    let sender = tokio::spawn(async move {
        for _ in 0..3 {
            get(url.clone()).await;
        }
    });
    within(server.wait_for_calls("w", 3)).await;
    assert!(server.count("w") >= 3);
    within(sender).await.unwrap();
}

#[tokio::test]
async fn dropped_connection_on_held_call_leaves_flight() {
    let server = CounterServer::start().await;
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(b"GET /hit/d?hold_first=1 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    within(server.wait_for_held("d")).await;
    assert_eq!(server.in_flight(), 1);

    drop(stream);
    within(server.wait_idle()).await;
    assert_eq!(server.in_flight(), 0);
    assert_eq!(server.calls_to("d")[0].ended_at, None, "never answered");

    // The hold was for the first call only.
    let (status, body) = get(server.url("/hit/d?hold_first=1")).await;
    assert_eq!((status, &body["count"]), (200, &json!(2)));
}

#[tokio::test]
async fn stop_releases_held_calls_and_closes_the_port() {
    let server = CounterServer::start().await;
    let addr = server.addr();
    let held = tokio::spawn(get(server.url("/hit/s?hold_first=1")));
    within(server.wait_for_held("s")).await;
    within(server.stop()).await;
    assert_eq!(within(held).await.unwrap().0, 200);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drop_does_not_block_with_a_held_call() {
    let server = CounterServer::start().await;
    let held = tokio::spawn(get(server.url("/hit/z?hold_first=1")));
    within(server.wait_for_held("z")).await;
    drop(server);
    // The drop signalled shutdown and released the hold.
    assert_eq!(within(held).await.unwrap().0, 200);
}
