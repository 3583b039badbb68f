//! Switchyard integrations: adapters behind the ports defined in
//! `switchyard-steps`.
//!
//! - [`http::ReqwestHttp`] implements [`switchyard_steps::http::HttpClient`]
//!   with reqwest over rustls (ring provider).
//! - [`llm::Providers`] implements [`switchyard_steps::llm::LanguageModel`]
//!   for OpenAI-compatible servers through async-openai, with provider limits.
//!
//! Call [`install_crypto_provider`] once before building any client.

pub mod http;
pub mod llm;

/// Installs ring as the process-wide rustls provider. Safe to call repeatedly.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
