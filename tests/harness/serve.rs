//! Serving an axum router on `127.0.0.1:0` in a task that a handle stops:
//! the part every local test server shares.

use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A router being served; stopped by [`Served::shut_down`] then
/// [`Served::join`], or (without waiting) when dropped.
pub(crate) struct Served {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Served {
    /// Binds `127.0.0.1:0` and serves `app` in a spawned task.
    ///
    /// # Panics
    ///
    /// If the loopback socket cannot be bound (a broken test environment).
    pub async fn start(app: Router) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address of listener");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // A dropped sender also resolves `stopped`, so the server never
            // outlives its handle.
            let signal = async {
                let _ = stopped.await;
            };
            let _ = axum::serve(listener, app).with_graceful_shutdown(signal).await;
        });
        Self { addr, shutdown: Some(shutdown), task: Some(task) }
    }

    /// Starts a graceful shutdown (in-flight requests finish).
    pub fn shut_down(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits until the server task has ended (after [`Served::shut_down`]).
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Resolves once `done` holds for the server's state: checked now, then on
/// every change, so a test waits for an event instead of sleeping.
pub(crate) async fn wait_until<T>(state: &watch::Sender<T>, mut done: impl FnMut(&T) -> bool) {
    let mut changes = state.subscribe();
    // It only errs when the sender is gone, and the caller holds it.
    let _ = changes.wait_for(|s| done(s)).await;
}
