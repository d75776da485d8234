use std::process::ExitCode;

use api::{ApiConfig, Application};
use shared::Env;

/// jemalloc rather than the system allocator: less CPU per request (BENCHMARKS.md, issue 12).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = match ApiConfig::from_env(&Env::from_process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("api: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("api: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _logs = shared::telemetry::init_logging(config.common.log_format);
    let served = shared::telemetry::run_then_stop(runtime, serve(config));
    match served {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "api panicked");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ApiConfig) -> ExitCode {
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("api: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until(shared::telemetry::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server error");
            ExitCode::FAILURE
        }
    }
}
