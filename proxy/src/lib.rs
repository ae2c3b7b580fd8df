//! The embedded HTTP(S) ingress: routing by Host, balancing by concurrency, the request queue,
//! health checks and the CPU gate. It knows nothing about containers: it sees upstream
//! addresses, a concurrency limit and a CPU control to call.

pub mod config;
pub mod gate;
pub mod health;
pub mod metrics;
pub mod pool;
mod sync;
