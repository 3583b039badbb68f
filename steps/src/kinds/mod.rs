//! Built-in step kinds that do work. Each is one small type implementing
//! [`crate::Step`].

mod agent;
mod decide;
mod fail;
mod http;
mod llm;
mod model;
mod sleep;
mod transform;
mod wait;

pub use agent::Agent;
pub use decide::Decide;
pub use fail::Fail;
pub use http::Http;
pub use llm::Llm;
pub use sleep::Sleep;
pub use transform::Transform;
pub use wait::Wait;
