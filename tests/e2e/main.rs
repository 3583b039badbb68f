//! End-to-end tests: the engine against real SQLite files and real local
//! HTTP servers, and the `switchyard` binary as a real process.

mod agent;
mod cli;
mod engine;
mod examples;
mod hardening;
mod http;
mod llm;
mod props;
mod recovery;
mod rerun;
mod signals;
mod support;
mod telemetry;
mod vault;
