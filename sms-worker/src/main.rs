//! `sms-worker` runs the worker; `sms-worker dlq list|purge` inspects its dead-letter queue.

fn main() -> std::process::ExitCode {
    sms_worker::cli::main()
}
