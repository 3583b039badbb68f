//! Switchyard test harness: the real things end-to-end tests run against.
//!
//! - [`CounterServer`] is a local HTTP server on 127.0.0.1 that plays the
//!   "outside service" workflow `http` steps call. It records every call as a
//!   [`Call`], lets a test shape replies through query parameters (delay,
//!   status, fail the first N, hold the first N), and offers waiting helpers
//!   ([`CounterServer::wait_for_calls`], [`CounterServer::wait_for_held`],
//!   [`CounterServer::wait_idle`]) so tests never sleep to wait.
//! - [`ModelServer`] is a local OpenAI-compatible chat-completions server
//!   playing scripted [`Reply`]s and recording every [`ModelRequest`].
//! - [`OtlpReceiver`] is a real OTLP/HTTP receiver (protobuf, decoded with
//!   `opentelemetry-proto`) keeping the spans and metric names it gets.
//! - [`TempDir`] from [`temp_dir`] is a unique scratch directory removed on drop.
//! - [`install_crypto_provider`] must run once before building any HTTP client.

mod counter;
mod model;
mod otlp;
mod serve;
mod temp;

pub use counter::{Call, CounterServer};
pub use model::{ModelRequest, ModelServer, Reply};
pub use otlp::{OtlpReceiver, Received, ReceivedSpan};
pub use switchyard_integrations::install_crypto_provider;
pub use temp::{TempDir, temp_dir};
