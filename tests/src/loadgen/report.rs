//! What a run measured, printed as text or JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::Scenario;
use super::cost::{Costs, RssSample};

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(super) fn from_micros(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[index] as f64 / 1000.0
        };
        Some(Self {
            count: samples.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub concurrency: usize,
    pub elapsed_secs: f64,
    /// Successful operations (a whole flow for `signup`).
    pub ok: u64,
    pub throughput_per_sec: f64,
    pub latency: Option<Latency>,
    /// Failures by HTTP status (or `connect`, `timeout`, `no-sms`).
    pub errors: BTreeMap<String, u64>,
    /// `request` and `signup`: from the api's 202 to fake-sms receiving the SMS.
    pub delivery: Option<Latency>,
    /// `request`: accepted requests whose SMS had not arrived when the report was made.
    pub undelivered: Option<u64>,
    /// Figures of one scenario (`failover`: `failover_ms`, `back_to_first_ms`, SMS by provider,
    /// `token_calls_per_hour`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, f64>,
    /// `--cost`: CPU per accepted operation, process by process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub costs: Option<Costs>,
    /// `--rss-every`: resident memory over the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss: Vec<RssSample>,
    /// `request`: the numbers whose request was answered 503. None of them may get an SMS
    /// (`scripts/drill` checks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_503: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario     {:?} (concurrency {})",
            self.scenario, self.concurrency
        )?;
        writeln!(f, "elapsed      {:.2} s", self.elapsed_secs)?;
        writeln!(f, "ok           {}", self.ok)?;
        writeln!(f, "throughput   {:.0}/s", self.throughput_per_sec)?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, l: &Option<Latency>| match l {
            Some(l) => writeln!(
                f,
                "{name:<12} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
            ),
            None => Ok(()),
        };
        line(f, "latency", &self.latency)?;
        line(f, "202→sms", &self.delivery)?;
        if let Some(n) = self.undelivered {
            writeln!(f, "undelivered  {n}")?;
        }
        for (name, value) in &self.figures {
            writeln!(f, "{name:<12} {value:.0}")?;
        }
        if let Some(costs) = &self.costs {
            writeln!(f, "cpu per op   (over {} operations)", costs.operations)?;
            // One line per program: PostgreSQL's process per connection would fill the screen.
            for group in costs.processes.chunk_by(|a, b| a.name == b.name) {
                // Each backend's RSS counts the shared buffers it touched: a sum overstates.
                let (label, rss) = match group {
                    [one] => (format!("{}[{}]", one.name, one.pid), "RSS"),
                    many => (format!("{} ×{}", many[0].name, many.len()), "RSS summed"),
                };
                writeln!(
                    f,
                    "  {:<14} {:>8.1} µs  ({:.0} ms CPU, {rss} {:.1} MiB)",
                    label,
                    group.iter().map(|p| p.us_per_op).sum::<f64>(),
                    group.iter().map(|p| p.cpu_ms).sum::<f64>(),
                    group.iter().map(|p| p.rss_mib).sum::<f64>()
                )?;
            }
            writeln!(
                f,
                "  {:<14} {:>8.1} µs",
                "stack total", costs.total_us_per_op
            )?;
            writeln!(
                f,
                "  {:<14} {:>8.1} µs  (not in the total)",
                "loadgen", costs.loadgen_us_per_op
            )?;
        }
        if let (Some(first), Some(last)) = (self.rss.first(), self.rss.last()) {
            writeln!(
                f,
                "rss          first sample → last ({:.0} s later)",
                last.at_secs - first.at_secs
            )?;
            for ((name, pid, start), (_, _, end)) in first.rss_mib.iter().zip(&last.rss_mib) {
                let change = (end - start) / start.max(f64::MIN_POSITIVE) * 100.0;
                writeln!(
                    f,
                    "  {:<14} {start:.1} → {end:.1} MiB ({change:+.1} %)",
                    format!("{name}[{pid}]")
                )?;
            }
        }
        if self.errors.is_empty() {
            writeln!(f, "errors       none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            writeln!(f, "errors       {}", list.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = Latency::from_micros((1..=100).map(|n| n * 1000).collect()).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (51.0, 99.0, 100.0));
    }
}
