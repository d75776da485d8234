use api::{ApiConfig, Application};
use shared::Env;

#[tokio::main]
async fn main() {
    let config = match ApiConfig::from_env(&Env::from_process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("api: {e}");
            std::process::exit(2);
        }
    };
    shared::telemetry::init_logging(config.common.log_format);
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("api: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = app.run_until(shared::telemetry::shutdown_signal()).await {
        tracing::error!(error = %e, "server error");
        std::process::exit(1);
    }
}
