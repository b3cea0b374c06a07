//! Progress for long operations: a bar on a terminal, plain lines otherwise (CI logs,
//! pipes), so that neither gets the other's noise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports `done / total` of something.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_line: Option<Instant>,
    last_done: u64,
}

impl Progress {
    /// Starts reporting `label` out of `total` on stderr.
    pub fn new(label: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                    .expect("the template is a constant that parses")
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_owned());
            bar
        });
        Progress {
            bar,
            label: label.to_owned(),
            last_line: None,
            last_done: u64::MAX,
        }
    }

    /// Updates the count; plain output prints a line at most every two seconds, and only
    /// when the count moved.
    pub fn set(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        let due = self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if due && done != self.last_done {
            eprintln!("{}: {done}/{total}", self.label);
            self.last_line = Some(Instant::now());
            self.last_done = done;
        }
    }

    /// Ends the report.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
