//! Switchyard integrations: adapters behind the ports defined in
//! `switchyard-steps`.
//!
//! - [`http::ReqwestHttp`] implements [`switchyard_steps::http::HttpClient`]
//!   with reqwest over rustls (ring provider).
//! - [`llm::Providers`] implements [`switchyard_steps::llm::LanguageModel`]
//!   for OpenAI-compatible servers through async-openai, with provider limits.
//! - [`vault`] is the credential vault's cryptography: master key, data
//!   keys, sealed fields (AES-256-GCM with ring) and the [`vault::Secret`]
//!   type.
//!
//! Call [`install_crypto_provider`] once before building any client.

pub mod http;
pub mod llm;
pub mod vault;

/// Installs ring as the process-wide rustls provider. Safe to call repeatedly.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
