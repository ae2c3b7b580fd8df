//! The proxy's own HTTP/2 server (RFC 9113), for h2c with prior knowledge and for TLS
//! connections that chose `h2`.
//!
//! hyper's server, built on the `h2` crate, runs every stream as a task of its own and
//! passes each request and response through shared, locked stream state; for the short
//! requests a proxy mostly carries that is most of its cost. Here one task serves a whole
//! connection ([`conn::Connection`]): it reads frames, decodes each request's fields
//! ([`hpack`]), hands the request to the same forwarding code as every other request
//! (routing, queue, gate, retries, access log), polls the answers, and writes their heads
//! and bodies within the client's flow-control windows. A request body is the one thing
//! shared with another task (hyper's client sends it to the instance): [`body`].
//!
//! What it does not do: server push (never used by a proxy), extended CONNECT
//! (`:protocol`, WebSockets over HTTP/2: refused, as hyper's server refuses them too),
//! priorities (read and checked, not acted on, as RFC 9113 allows).

pub(crate) mod body;
pub(crate) mod conn;
pub(crate) mod frame;
pub(crate) mod hpack;

pub(crate) use conn::{Config, Connection};
