//! Logs (`LOG_FORMAT`, `RUST_LOG`) and the Prometheus recorder shared by both programs.

mod log_writer;
pub mod throttle;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::LogFormat;
use log_writer::{BatchedWriter, WriterGuard};

/// The log writer, for the count of lines it dropped since start-up (it drops rather than block).
static LOG_WRITER: OnceLock<BatchedWriter> = OnceLock::new();

/// Flushes the log writer when dropped: keep it alive until the program ends.
#[must_use = "logs written after the guard is dropped are lost"]
pub struct LogGuard(#[allow(dead_code)] WriterGuard);

/// Installs the global log subscriber. Level comes from `RUST_LOG` (default `info`), except
/// that other crates never log below `info` (see [`log_allowed`]). Returns quietly when
/// one is already installed (tests build several apps in one process).
///
/// Lines are written by a background thread, in batches (see [`log_writer`]), so a request
/// never waits on stdout (synchronous writes cost about a third of the api's throughput under
/// load). A line reaches stdout at most 20 ms after it was logged. When the writer falls behind
/// (stdout blocked, a slow log shipper), lines are dropped rather than requests held up, and
/// counted in `log_lines_dropped_total`.
pub fn init_logging(format: LogFormat) -> LogGuard {
    let (writer, guard) = BatchedWriter::start(std::io::stdout());
    let _ = LOG_WRITER.set(writer.clone());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    // Global filters, not per-layer ones: a span that a per-layer filter turned away while
    // another filter enabled it can be missing from the lines logged inside it.
    let _already_installed = tracing_subscriber::registry()
        .with(filter)
        .with(filter_fn(log_allowed))
        .with(layer)
        .try_init();
    LogGuard(guard)
}

/// Runs a program's main task on `runtime`'s threads, then stops the runtime, giving tasks still
/// running a second. Spawned rather than driven by `block_on`, so that the task's wake-ups do not
/// also go through this thread (BENCHMARKS.md, round 5); call it while the [`LogGuard`] lives, so
/// that what the last tasks log is written rather than counted as dropped.
pub fn run_then_stop<F>(
    runtime: tokio::runtime::Runtime,
    task: F,
) -> Result<F::Output, tokio::task::JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let outcome = runtime.block_on(runtime.spawn(task));
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// Targets never logged, at any level: lapin logs a message the broker returned (a `mandatory`
/// publish that reached no queue) at `warn`, body and all, and an event's body holds its code
/// and number. The publisher reports the return itself, without them.
const NEVER_LOGGED: &[&str] = &["lapin::returned_messages"];

/// Whether an event may be logged, whatever `RUST_LOG` says. Below `info` only this workspace's
/// own crates (which never log a code, a token or a full number at any level) and tower_http's
/// request spans are. Other crates log what passes through them at debug and trace (lapin every
/// AMQP frame, with the event's code in it; hyper and reqwest bodies and headers), so they stop
/// at `info`; and [`NEVER_LOGGED`] never.
pub fn log_allowed(metadata: &Metadata<'_>) -> bool {
    allowed(metadata.target(), *metadata.level())
}

fn allowed(target: &str, level: Level) -> bool {
    let never = NEVER_LOGGED.iter().any(|never| {
        target
            .strip_prefix(never)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    if never {
        return false;
    }
    if level <= Level::INFO {
        return true;
    }
    let crate_name = target.split("::").next().unwrap_or(target);
    matches!(
        crate_name,
        "api" | "sms_worker" | "shared" | "tests" | "fake_sms" | "loadgen" | "tower_http"
    )
}

/// Latency buckets, in seconds, for every `*_duration_seconds` histogram.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Renders every metric in Prometheus text format, with `log_lines_dropped_total` brought up to
/// date first.
pub fn render_metrics() -> String {
    let handle = metrics_handle();
    if let Some(writer) = LOG_WRITER.get() {
        metrics::counter!("log_lines_dropped_total").absolute(writer.dropped_lines());
    }
    handle.render()
}

/// Buckets, in seconds, for `sms_delivery_seconds`: from the provider accepting an SMS to the
/// carrier's `delivered`, which takes seconds to minutes.
const DELIVERY_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0,
];

/// `# HELP` for the metrics this crate records. Each program calls it with its own.
pub fn describe() {
    metrics::describe_counter!(
        "log_lines_dropped_total",
        "Log lines dropped because the log writer fell behind."
    );
    crate::serve::describe();
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_duration_seconds".into()),
                    DURATION_BUCKETS,
                )
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("sms_delivery_seconds".into()),
                    DELIVERY_BUCKETS,
                )
                .expect("the bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            drain_histograms(handle.clone());
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const HISTOGRAM_UPKEEP: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample in a queue until upkeep folds it into its buckets.
/// `PrometheusBuilder::install` runs upkeep on a timer, but a recorder from `build_recorder` (ours:
/// the programs serve `/metrics` themselves) leaves it to a scrape. Unscraped, that queue grew by
/// every request's samples: the api's RSS climbed 20 MiB in five minutes at 2,000 OTPs/s, the
/// worker's 10 MiB. A thread of its own, so it runs whether or not a Tokio runtime is there.
fn drain_histograms(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(HISTOGRAM_UPKEEP);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are folded at scrapes only");
    }
}

/// Resolves when the process is asked to stop: SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_messages_are_never_logged_and_other_crates_stop_at_info() {
        assert!(!allowed("lapin::returned_messages", Level::WARN));
        assert!(!allowed("lapin::returned_messages", Level::ERROR));
        assert!(allowed(
            "lapin::returned_messages_of_another_kind",
            Level::WARN
        ));
        assert!(allowed("lapin::channel", Level::WARN));
        assert!(!allowed("lapin::channel", Level::DEBUG));
        assert!(allowed("sms_worker::worker", Level::DEBUG));
        assert!(allowed("api", Level::TRACE));
        assert!(!allowed("hyper::proto", Level::TRACE));
    }
}
