//! Percentiles and process figures for the benchmark reports.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// p50, p95 and p99 in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Collects durations with microsecond resolution.
#[derive(Debug)]
pub(super) struct Latencies(Histogram<u64>);

impl Latencies {
    pub(super) fn new() -> Self {
        // Up to an hour at three significant digits: ample for any run or request.
        Latencies(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid"),
        )
    }

    pub(super) fn record(&mut self, d: Duration) {
        let micros = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        self.0
            .record(micros)
            .expect("clamped into the histogram's bounds");
    }

    pub(super) fn len(&self) -> u64 {
        self.0.len()
    }

    pub(super) fn percentiles(&self) -> Percentiles {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
        }
    }
}

/// Peak resident memory (MiB) and CPU seconds of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct ProcessUsage {
    /// Peak resident set size (VmHWM), MiB.
    pub(super) peak_rss_mb: f64,
    /// User plus system CPU time, seconds.
    pub(super) cpu_seconds: f64,
}

/// Linux reports CPU time in clock ticks of 1/100 s on every mainstream platform.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Reads a live process's figures; `None` when /proc has no such process.
pub(super) fn process_usage(pid: u32) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcessUsage {
        peak_rss_mb: peak_kb / 1024.0,
        cpu_seconds: (ticks(11) + ticks(12)) / CLOCK_TICKS_PER_SECOND,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut l = Latencies::new();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let p = l.percentiles();
        assert!((p.p50 - 50.0).abs() < 0.5, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.5, "{p:?}");
    }

    #[test]
    fn own_process_usage_is_readable() {
        let usage = process_usage(std::process::id()).expect("/proc/self exists on Linux");
        assert!(usage.peak_rss_mb > 0.0);
    }
}
