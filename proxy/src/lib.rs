//! The embedded HTTP(S) ingress: routing by Host, balancing by concurrency, the request queue,
//! health checks and the CPU gate. It knows nothing about containers: it sees upstream
//! addresses, a concurrency limit and a CPU control to call.

pub mod access_log;
pub mod config;
pub mod demand;
pub mod edge;
mod fast;
pub mod forward;
pub mod gate;
mod h2;
pub mod headers;
pub mod health;
mod idle;
pub mod metrics;
pub mod pool;
pub mod routes;
pub mod server;
mod sync;
pub mod tls;

pub use edge::Edge;
pub use routes::{Route, RouteTable};
pub use server::{Proxy, ProxyOptions, ShutdownReport};
