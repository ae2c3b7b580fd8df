//! The embedded HTTP(S) ingress: routing, balancing, queueing, health checks and the CPU gate caller (filled by the proxy issue).
