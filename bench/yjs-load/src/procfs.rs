//! CPU time and memory from /proc and getrusage: the loadgen's own CPU (to show it is not the
//! bottleneck) and, given `--server-pid`, the server's CPU time and RSS.

use std::time::Duration;

/// CPU time (user + system) this process has used so far.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of `pid` from /proc/PID/stat.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks as f64))
}

/// VmRSS of `pid` in KiB.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Raises the soft open-files limit to the hard limit (thousands of sockets in `idle`).
pub fn raise_nofile_limit() {
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Server-side resource use over a measured interval.
pub struct ServerProbe {
    pid: Option<u32>,
    cpu_start: Option<Duration>,
    rss_start: Option<u64>,
}

impl ServerProbe {
    pub fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            cpu_start: pid.and_then(process_cpu),
            rss_start: pid.and_then(process_rss_kib),
        }
    }

    pub fn finish(&self) -> serde_json::Value {
        let Some(pid) = self.pid else { return serde_json::Value::Null };
        let cpu_end = process_cpu(pid);
        let cpu_s = match (self.cpu_start, cpu_end) {
            (Some(a), Some(b)) => Some(((b.saturating_sub(a)).as_secs_f64() * 1000.0).round() / 1000.0),
            _ => None,
        };
        serde_json::json!({
            "pid": pid,
            "cpu_s": cpu_s,
            "rss_kib_before": self.rss_start,
            "rss_kib_after": process_rss_kib(pid),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(super::process_cpu(pid).is_some());
        assert!(super::process_rss_kib(pid).unwrap() > 0);
    }
}
