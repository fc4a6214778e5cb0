//! Latency samples and percentiles (nearest rank on the sorted samples; runs are small enough
//! to keep every sample, so no histogram error).

use serde_json::json;

#[derive(Default, Debug, Clone)]
pub struct Samples {
    ns: Vec<u64>,
}

impl Samples {
    pub fn push_ns(&mut self, ns: u64) {
        self.ns.push(ns);
    }

    pub fn push(&mut self, d: std::time::Duration) {
        self.ns.push(d.as_nanos() as u64);
    }

    pub fn merge(&mut self, other: Samples) {
        self.ns.extend(other.ns);
    }

    pub fn len(&self) -> usize {
        self.ns.len()
    }

    /// `{count, p50, p90, p99, max, mean}` in milliseconds (null when there are no samples).
    pub fn summary_ms(&mut self) -> serde_json::Value {
        if self.ns.is_empty() {
            return json!({"count": 0, "p50": null, "p90": null, "p99": null, "max": null, "mean": null});
        }
        self.ns.sort_unstable();
        let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
        let pct = |p: f64| {
            let rank = ((p / 100.0) * self.ns.len() as f64).ceil() as usize;
            ms(self.ns[rank.clamp(1, self.ns.len()) - 1])
        };
        let mean = self.ns.iter().map(|&v| v as f64).sum::<f64>() / self.ns.len() as f64;
        json!({
            "count": self.ns.len(),
            "p50": pct(50.0),
            "p90": pct(90.0),
            "p99": pct(99.0),
            "max": ms(*self.ns.last().unwrap_or(&0)),
            "mean": ms(mean as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for i in 1..=100u64 {
            s.push_ns(i * 1_000_000);
        }
        let v = s.summary_ms();
        assert_eq!(v["p50"], 50.0);
        assert_eq!(v["p99"], 99.0);
        assert_eq!(v["max"], 100.0);
        assert_eq!(Samples::default().summary_ms()["p50"], serde_json::Value::Null);
    }
}
