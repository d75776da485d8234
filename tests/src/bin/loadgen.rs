//! `loadgen`: drives a running stack and prints throughput and latency. See BENCHMARKS.md.

use clap::Parser;
use tests::loadgen::{Args, run};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let json = args.json;
    match run(args).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{report}");
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(1);
        }
    }
}
