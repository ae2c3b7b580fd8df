//! The admin API: HTTP/JSON over a Unix socket, versioned paths (`/v1/...`), errors with a
//! stable code and a human message, long operations answered with an id whose progress
//! streams as JSON lines. [`router`] maps paths to handlers, [`server`] owns the socket,
//! [`client`] is what the CLI speaks.

pub mod client;
pub mod error;
pub mod router;
pub mod server;

pub use client::{Client, ClientError};
pub use error::{ApiError, ErrorCode, FieldError};
pub use router::{ApiRequest, Reply, Router, UpgradeHandler, Upgraded};
