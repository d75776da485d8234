//! `sms-worker` runs the worker; `sms-worker dlq list|purge` inspects its dead-letter queue.

/// mimalloc rather than the system allocator: less CPU per message (BENCHMARKS.md, issue 12).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sms_worker::cli::main()
}
