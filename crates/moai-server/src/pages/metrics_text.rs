//! Reads the numbers the dashboard needs out of the /metrics registry's text, so the dashboard
//! shows exactly what /metrics publishes and no second set of counters has to be kept in step.
//! Only the families listed in [`Sample::read`] are parsed; everything else is skipped by name.

use std::collections::BTreeMap;

/// What one reading of the registry holds for the dashboard. Counters are totals since start.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sample {
    /// Open WebSocket sessions by protocol.
    pub connections: BTreeMap<String, f64>,
    /// Messages received / sent by protocol (totals).
    pub messages_in: BTreeMap<String, f64>,
    pub messages_out: BTreeMap<String, f64>,
    pub bytes_in: f64,
    pub bytes_out: f64,
    /// Refusals by reason (totals).
    pub rejected: BTreeMap<String, f64>,
    pub unknown_messages: f64,
    pub commits: f64,
    pub commit_seconds: f64,
    /// Commit latency histogram: (upper bound in seconds, cumulative count), ascending.
    pub commit_buckets: Vec<(f64, f64)>,
    pub batch_writes: f64,
}

impl Sample {
    pub(crate) fn read(text: &str) -> Sample {
        let mut s = Sample::default();
        for line in text.lines() {
            if !line.starts_with("moai_") {
                continue;
            }
            let Some((name, labels, value)) = parse_line(line) else { continue };
            let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap_or_default();
            match name {
                "moai_connections" => drop(s.connections.insert(label("protocol"), value)),
                "moai_messages_total" => {
                    let map = if label("direction") == "in" { &mut s.messages_in } else { &mut s.messages_out };
                    map.insert(label("protocol"), value);
                }
                "moai_bytes_total" => {
                    if label("direction") == "in" {
                        s.bytes_in += value
                    } else {
                        s.bytes_out += value
                    }
                }
                "moai_rejected_total" => drop(s.rejected.insert(label("reason"), value)),
                "moai_unknown_messages_total" => s.unknown_messages += value,
                "moai_storage_commit_seconds_count" => s.commits = value,
                "moai_storage_commit_seconds_sum" => s.commit_seconds = value,
                "moai_storage_commit_seconds_bucket" => {
                    let le = label("le");
                    let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                    s.commit_buckets.push((bound, value));
                }
                "moai_storage_batch_writes_sum" => s.batch_writes = value,
                _ => {}
            }
        }
        s.commit_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    }

    pub(crate) fn deliveries(&self) -> f64 {
        self.messages_out.values().fold(0.0, |a, b| a + b)
    }

    pub(crate) fn received(&self) -> f64 {
        self.messages_in.values().fold(0.0, |a, b| a + b)
    }
}

/// A line's labels: (name, value) pairs.
type Labels = Vec<(String, String)>;

/// `name{k="v",…} value` (labels optional; OpenMetrics escapes `\\`, `\"` and `\n` in values).
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else { return Some((head, Vec::new(), value)) };
    let mut body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    while !body.is_empty() {
        let (key, after) = body.split_once("=\"")?;
        let mut val = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()? {
                    (_, 'n') => val.push('\n'),
                    (_, c) => val.push(c),
                },
                (i, '"') => break i,
                (_, c) => val.push(c),
            }
        };
        labels.push((key.to_owned(), val));
        body = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

/// The `q` quantile (0..1) of the observations between two readings of a cumulative histogram,
/// as the upper bound of the bucket it falls in (None without observations).
pub(crate) fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let count_at = |buckets: &[(f64, f64)], i: usize| buckets.get(i).map_or(0.0, |b| b.1);
    let total = after.last()?.1 - before.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return None;
    }
    let want = (q * total).ceil().max(1.0);
    for (i, (bound, cumulative)) in after.iter().enumerate() {
        if cumulative - count_at(before, i) >= want {
            return Some(*bound);
        }
    }
    after.last().map(|b| b.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Direction, Metrics, Protocol};
    use moai_storage::StorageObserver as _;
    use std::time::Duration;

    #[test]
    fn reads_what_the_registry_publishes() {
        let m = Metrics::new("9.9.9");
        m.connection_opened(Protocol::Yjs);
        m.connection_opened(Protocol::Yjs);
        m.connection_opened(Protocol::Cojson);
        m.message(Protocol::Yjs, Direction::Out, 10);
        m.message(Protocol::Yjs, Direction::Out, 10);
        m.message(Protocol::Pgsync, Direction::Out, 5);
        m.message(Protocol::Yjs, Direction::In, 7);
        m.rejected("max_connections");
        m.rejected("weird \"reason\"");
        m.batch_committed(3, Duration::from_micros(300));
        m.batch_committed(1, Duration::from_millis(20));
        let s = Sample::read(&m.encode());
        assert_eq!(s.connections["yjs"], 2.0);
        assert_eq!(s.connections["cojson"], 1.0);
        assert_eq!(s.deliveries(), 3.0);
        assert_eq!(s.received(), 1.0);
        assert_eq!((s.bytes_out, s.bytes_in), (25.0, 7.0));
        assert_eq!(s.rejected["max_connections"], 1.0);
        assert_eq!(s.rejected["weird \"reason\""], 1.0);
        assert_eq!((s.commits, s.batch_writes), (2.0, 4.0));
        assert!((s.commit_seconds - 0.0203).abs() < 1e-9, "{}", s.commit_seconds);
        assert_eq!(s.commit_buckets.last().unwrap(), &(f64::INFINITY, 2.0));
        let p50 = quantile_between(&[], &s.commit_buckets, 0.5).unwrap();
        let p99 = quantile_between(&[], &s.commit_buckets, 0.99).unwrap();
        assert!((0.0003..0.001).contains(&p50), "{p50}");
        assert!((0.02..0.05).contains(&p99), "{p99}");
        assert_eq!(quantile_between(&s.commit_buckets, &s.commit_buckets, 0.5), None, "nothing in between");
    }

    #[test]
    fn odd_lines_are_skipped() {
        let s = Sample::read("moai_connections{protocol=\"yjs\"} x\nmoai_connections{protocol=\"yjs\" 3\n# moai\nmoai_rejected_total 4\n");
        assert!(s.connections.is_empty());
        assert_eq!(s.rejected.get(""), Some(&4.0));
    }
}
