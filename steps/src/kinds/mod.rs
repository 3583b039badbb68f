//! Built-in step kinds that do work. Each is one small type implementing
//! [`crate::Step`].

mod fail;
mod http;
mod sleep;
mod transform;
mod wait;

pub use fail::Fail;
pub use http::Http;
pub use sleep::Sleep;
pub use transform::Transform;
pub use wait::Wait;
