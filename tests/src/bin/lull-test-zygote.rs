//! The zygote for tests: the same code `lull __zygote` runs, in a binary that `cargo test` builds
//! for the test crates (which cannot depend on the `lull` binary).

fn main() {
    use lull_runtime::instance::zygote;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| lull_runtime::instance::zygote::DiagnosticsWriter)
        .with_ansi(false)
        .init();
    std::process::exit(zygote::serve(zygote::ZYGOTE_FD));
}
