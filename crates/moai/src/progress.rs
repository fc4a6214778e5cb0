//! Progress of the offline commands that copy bytes (`backup`, `restore`, `doc import`) on
//! stderr: an indicatif bar on a terminal, otherwise a plain line at most once a second, so
//! logs and CI keep a readable record. (`migrate` counts items and has its own, in migrate.rs.)

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct ByteProgress {
    command: &'static str,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    done: u64,
    total: u64,
}

impl ByteProgress {
    /// `unit` names what is counted in the plain lines ("bytes", "pages").
    pub fn new(command: &'static str, what: &str) -> ByteProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template("{msg} [{wide_bar}] {percent:>3}% eta {eta:>3}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = ProgressBar::new(0).with_style(style).with_message(format!("{command} {what}"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        ByteProgress { command, bar, last_line: None, done: 0, total: 0 }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        (self.done, self.total) = (done, total);
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                if self.last_line.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    self.last_line = Some(Instant::now());
                    self.line();
                }
            }
        }
    }

    fn line(&self) {
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
        eprintln!("moai {}: {}/{} ({percent}%)", self.command, self.done, self.total);
    }

    pub fn finish(self) {
        match self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.line(),
        }
    }
}
