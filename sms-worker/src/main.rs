//! `sms-worker` runs the worker; `sms-worker dlq list|purge` inspects its dead-letter queue.

/// jemalloc rather than the system allocator: less CPU per message (BENCHMARKS.md, issue 12).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    sms_worker::cli::main()
}
