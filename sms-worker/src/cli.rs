//! The command line: `sms-worker` runs the worker; `sms-worker dlq list|purge` inspects its
//! dead-letter queue; `sms-worker trace <phone>` tells what became of a number's last sends.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shared::{CommonConfig, Env};

#[derive(Parser)]
#[command(
    version,
    about = "Sends OTP SMS from RabbitMQ through Twilio. Configured by environment variables (see README)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect the dead-letter queue ({NAMESPACE}.sms.dlq).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Show the last day's sends to one number: each event's timeline (requested, provider
    /// calls, receipts, resends). Codes are never kept; the number is masked in the output.
    Trace {
        /// The number, in E.164 (+14155550100).
        phone: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show entries without removing them: numbers masked, codes never shown.
    List {
        /// At most this many entries, oldest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete every entry (asks first).
    Purge {
        /// Do not ask: for scripts.
        #[arg(long)]
        yes: bool,
    },
}

/// Parses the command line and runs what it asks for; the exit status follows the outcome (2 for
/// invalid configuration).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None => {
            let config = match crate::Config::from_env(&env) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let _logs = shared::telemetry::init_logging(config.common.log_format);
            let outcome = shared::telemetry::run_then_stop(
                runtime,
                crate::run(config, shared::telemetry::shutdown_signal()),
            );
            match outcome {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    tracing::error!(error = format!("{e:#}"), "sms-worker failed");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!(error = %e, "sms-worker panicked");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Trace { phone, json }) => {
            let Ok(phone) = shared::PhoneNumber::parse(&phone) else {
                eprintln!(
                    "error: {} is not a number in E.164 form (+14155550100)",
                    shared::mask_phone(&phone)
                );
                return ExitCode::from(2);
            };
            let (config, seal) = match CommonConfig::from_env(&env).and_then(|config| {
                let seal = env
                    .secret("WORKER_SEAL_KEY")
                    .map(|key| {
                        crate::seal::SealKey::from_base64(&key)
                            .map_err(|e| shared::ConfigError::new("WORKER_SEAL_KEY", e))
                    })
                    .transpose()?;
                Ok((config, seal))
            }) {
                Ok(parsed) => parsed,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(trace(&config, seal, &phone, json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Dlq { command }) => {
            let config = match CommonConfig::from_env(&env) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(dlq(&config, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn dlq(config: &CommonConfig, command: DlqCommand) -> anyhow::Result<()> {
    use crate::dead_letter::entries;
    match command {
        DlqCommand::List { limit, json } => {
            let listing = crate::dead_letter::list(config, limit).await?;
            if json {
                for entry in &listing.entries {
                    println!("{}", crate::terminal::json_line(entry)?);
                }
            } else if !listing.entries.is_empty() {
                println!("{}", crate::dead_letter::format_table(&listing.entries));
            }
            eprintln!(
                "{}: {}, {} shown; all left in place",
                listing.queue,
                entries(u64::from(listing.total)),
                listing.entries.len()
            );
        }
        DlqCommand::Purge { yes } => {
            if !yes {
                let (queue, count) = crate::dead_letter::count(config).await?;
                if count == 0 {
                    eprintln!("{queue}: empty, nothing to purge");
                    return Ok(());
                }
                eprint!(
                    "Delete {} of {queue}? Their failures cannot be looked at afterwards. Type yes to confirm: ",
                    entries(u64::from(count))
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != "yes" {
                    anyhow::bail!("not purged (answer yes, or pass --yes)");
                }
            }
            let (queue, purged) = crate::dead_letter::purge(config).await?;
            eprintln!("{queue}: purged {}", entries(u64::from(purged)));
        }
    }
    Ok(())
}

async fn trace(
    config: &CommonConfig,
    seal: Option<crate::seal::SealKey>,
    phone: &shared::PhoneNumber,
    json: bool,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let redis = shared::redis_connection::RedisConnection::new(&config.redis)
        .context("cannot set up the Redis client")?;
    let timelines =
        crate::trace::Timelines::new(redis, &config.namespace, seal.map(std::sync::Arc::new));
    let lines = timelines
        .read(phone)
        .await
        .context("cannot read from Redis")?;
    if lines.is_empty() {
        eprintln!(
            "{}: nothing recorded in the last 24 h in namespace {} (the workers' WORKER_SEAL_KEY must be set here too)",
            phone.masked(),
            config.namespace
        );
        return Ok(());
    }
    if json {
        for line in &lines {
            println!("{}", crate::terminal::json_line(line)?);
        }
    } else {
        print!("{}", crate::trace::print(&phone.masked(), &lines));
    }
    Ok(())
}
