//! `report`: reads the JSON reports of a bench run and prints markdown tables of medians, the
//! issue's targets checked against them, and every anomaly (lost deliveries, bad frames, failed
//! connections) so nothing is averaged away.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Directory holding the *.json reports of one bench run.
    #[arg(long)]
    pub dir: PathBuf,
    /// The server whose targets are checked; the bare relay's label.
    #[arg(long, default_value = "moai")]
    pub subject: String,
    #[arg(long, default_value = "relay")]
    pub relay: String,
    /// Cluster targets: the cross-instance server (writers on one instance, readers on others)…
    #[arg(long, default_value = "moai-cluster")]
    pub cluster: String,
    /// …against this single instance on the same storage.
    #[arg(long, default_value = "moai-pg")]
    pub single: String,
}

/// Column title, JSON pointer, divisor.
type Col = (&'static str, &'static str, f64);

const FANOUT: &[Col] = &[
    ("deliveries/s", "/deliveries_per_s", 1.0),
    ("p50 ms", "/latency_ms/p50", 1.0),
    ("p99 ms", "/latency_ms/p99", 1.0),
    ("max ms", "/latency_ms/max", 1.0),
    ("≥ 10 ms", "/slow_deliveries/count", 1.0),
    ("lost", "/lost_deliveries", 1.0),
    ("send lag p99 ms", "/send_lag_ms/p99", 1.0),
    ("loadgen CPU s", "/loadgen_cpu_s", 1.0),
    ("server CPU s", "/server/cpu_s", 1.0),
    ("CPU s, all instances", "/servers_cpu_s", 1.0),
    ("server RSS MiB", "/server/rss_kib_after", 1024.0),
    ("connect p99 ms", "/connect/connect_sync_ms/p99", 1.0),
];
const BIGDOC: &[Col] = &[
    ("edit p50 ms", "/edit_latency_ms/p50", 1.0),
    ("edit p99 ms", "/edit_latency_ms/p99", 1.0),
    ("edit max ms", "/edit_latency_ms/max", 1.0),
    ("lost", "/lost_edits", 1.0),
    ("upload→observer ms", "/upload_to_observer_ms", 1.0),
    ("late joiner ms", "/late_joiner_full_state_ms", 1.0),
    ("server CPU s (edits)", "/server_during_edits/cpu_s", 1.0),
    ("server RSS MiB", "/server/rss_kib_after", 1024.0),
];
const IDLE: &[Col] = &[
    ("KiB/conn (marginal)", "/kib_per_connection_marginal", 1.0),
    ("KiB/conn (incl. docs)", "/kib_per_connection_incl_docs", 1.0),
    ("KiB/doc", "/kib_per_doc_with_one_connection", 1.0),
    ("connected", "/connected", 1.0),
    ("closed while idle", "/closed_while_idle", 1.0),
    ("server RSS MiB", "/rss_kib/all", 1024.0),
];

fn columns(scenario: &str) -> &'static [Col] {
    match scenario {
        "fanout" => FANOUT,
        "big-doc" => BIGDOC,
        _ => IDLE,
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// Preferred row order; other labels follow alphabetically.
fn rank(label: &str) -> (usize, String) {
    let order = [
        "moai",
        "moai-pg",
        "moai-pg-s3",
        "moai-cluster",
        "moai-cluster-mixed",
        "y-websocket-server",
        "hocuspocus",
        "relay",
    ];
    (order.iter().position(|o| *o == label).unwrap_or(order.len()), label.to_owned())
}

struct Group {
    scenario: String,
    runs: Vec<Value>,
}

impl Group {
    fn med(&self, pointer: &str, div: f64) -> Option<f64> {
        median(self.runs.iter().filter_map(|r| r.pointer(pointer)?.as_f64()).map(|x| x / div).collect())
    }
}

pub fn run(a: ReportArgs) -> Result<()> {
    // case -> label -> runs
    let mut cases: BTreeMap<String, BTreeMap<(usize, String), Group>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&a.dir)
        .with_context(|| format!("reading {}", a.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            failures.push(format!("{}: not a report (run failed?)", path.display()));
            continue;
        };
        let case = v["case"].as_str().unwrap_or("?").to_owned();
        let label = v["label"].as_str().unwrap_or("?").to_owned();
        let scenario = v["scenario"].as_str().unwrap_or("?").to_owned();
        anomalies(&path, &v, &mut failures);
        cases
            .entry(case)
            .or_default()
            .entry(rank(&label))
            .or_insert_with(|| Group { scenario, runs: Vec::new() })
            .runs
            .push(v);
    }

    for (case, groups) in &cases {
        let Some(first) = groups.values().next() else { continue };
        let cols = columns(&first.scenario);
        println!("\n### {case}\n");
        if let Some(p) = describe(&first.runs[0]) {
            println!("{p}\n");
        }
        print!("| server | runs |");
        cols.iter().for_each(|c| print!(" {} |", c.0));
        print!("\n|---|---|");
        cols.iter().for_each(|_| print!("---|"));
        println!();
        for ((_, label), g) in groups {
            print!("| {label} | {} |", g.runs.len());
            for (_, ptr, div) in cols {
                print!(" {} |", fmt(g.med(ptr, *div)));
            }
            println!();
        }
    }

    targets(&cases, &a);
    cluster_targets(&cases, &a);
    println!("\n### Anomalies\n");
    if failures.is_empty() {
        println!("none (no lost deliveries, bad frames, failed connections or unexpected closes)");
    }
    for f in failures {
        println!("- {f}");
    }
    Ok(())
}

fn describe(v: &Value) -> Option<String> {
    match v["scenario"].as_str()? {
        "fanout" => Some(format!(
            "{} docs × {} clients, {} writers/doc × {} updates at {} updates/s/writer (0 = unpaced); medians",
            v["docs"], v["clients_per_doc"], v["writers_per_doc"], v["updates_per_writer"], v["rate_per_writer"]
        )),
        "big-doc" => Some(format!(
            "{} MiB document, {} single-character edits {} ms apart; medians",
            fmt(v["state_bytes"].as_f64().map(|b| b / 1048576.0)),
            v["edits"],
            v["interval_ms"]
        )),
        "idle" => Some(format!("{} idle connections over {} docs; medians", v["connections"], v["docs"])),
        _ => None,
    }
}

fn anomalies(path: &std::path::Path, v: &Value, out: &mut Vec<String>) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let checks = [
        ("/lost_deliveries", "lost deliveries"),
        ("/lost_edits", "lost edits"),
        ("/duplicates", "duplicate deliveries"),
        ("/cross_doc_items", "items from another document"),
        ("/unexpected_items", "unexpected items"),
        ("/undecodable_updates", "undecodable updates"),
        ("/connect/failed/count", "failed connections"),
        ("/failed/count", "failed connections"),
        ("/closed_while_idle", "connections closed while idle"),
        ("/events/bad_frames", "bad frames"),
        ("/events/text_frames", "text frames"),
        ("/events/auth_denied", "auth denied"),
        ("/events/closed_by_server", "closed by server"),
        ("/events/socket_errors", "socket errors"),
        ("/events/sync_status_refused", "SyncStatus refused"),
    ];
    for (ptr, what) in checks {
        if let Some(n) = v.pointer(ptr).and_then(Value::as_f64) {
            if n > 0.0 {
                out.push(format!("{name}: {n} {what}"));
            }
        }
    }
}

fn targets(cases: &BTreeMap<String, BTreeMap<(usize, String), Group>>, a: &ReportArgs) {
    let find = |case: &Group| case.scenario.clone();
    let mut lines = Vec::new();
    for (case, groups) in cases {
        let get = |label: &str| groups.iter().find(|((_, l), _)| l == label).map(|(_, g)| g);
        let Some(subject) = get(&a.subject) else { continue };
        match find(subject).as_str() {
            "fanout" => {
                let d = |g: &Group| g.med("/deliveries_per_s", 1.0);
                let p99 = |g: &Group| g.med("/latency_ms/p99", 1.0);
                // Peers are other servers; moai itself on other storage (moai-pg, moai-pg-s3) is not
                // one.
                let peers = || {
                    groups.iter().filter(|((_, l), _)| *l != a.subject && *l != a.relay && !l.starts_with(&a.subject))
                };
                let paced = subject.runs[0]["rate_per_writer"].as_f64().unwrap_or(0.0) > 0.0;
                if paced {
                    // Fixed offered load: every server delivers the same rate, so only latency
                    // compares; against the peer with the lowest p99.
                    let best = peers()
                        .min_by(|x, y| p99(x.1).unwrap_or(f64::INFINITY).total_cmp(&p99(y.1).unwrap_or(f64::INFINITY)));
                    if let (Some(((_, peer), g)), Some(sp)) = (best, p99(subject)) {
                        let pp = p99(g).unwrap_or(f64::INFINITY);
                        lines.push(format!(
                            "{case} (fixed load, latency only): p99 {sp:.1} ms vs best peer {peer} {pp:.1} ms (half: {:.1}) {}",
                            pp / 2.0,
                            ok(sp <= pp / 2.0)
                        ));
                    }
                    continue;
                }
                let best = peers().max_by(|x, y| d(x.1).unwrap_or(0.0).total_cmp(&d(y.1).unwrap_or(0.0)));
                if let (Some(((_, peer), g)), Some(sd), Some(sp)) = (best, d(subject), p99(subject)) {
                    let (pd, pp) = (d(g).unwrap_or(0.0), p99(g).unwrap_or(f64::INFINITY));
                    lines.push(format!(
                        "{case}: deliveries/s {sd:.0} vs best peer {peer} {pd:.0} = {:.2}× (target ≥ 3×) {}; p99 {sp:.1} ms vs {pp:.1} ms (target ≤ {:.1}) {}",
                        sd / pd.max(1.0),
                        ok(sd >= 3.0 * pd),
                        pp / 2.0,
                        ok(sp <= pp / 2.0)
                    ));
                }
                if let (Some(r), Some(sd)) = (get(&a.relay).and_then(d), d(subject)) {
                    lines.push(format!(
                        "{case}: {:.0} % of the bare relay's {r:.0} deliveries/s (target ≥ 50 %) {}",
                        100.0 * sd / r.max(1.0),
                        ok(sd >= 0.5 * r)
                    ));
                }
            }
            "big-doc" => {
                if let Some(p) = subject.med("/edit_latency_ms/p99", 1.0) {
                    lines.push(format!("{case}: edit p99 {p:.2} ms (target ≤ 5 ms) {}", ok(p <= 5.0)));
                }
            }
            _ => {
                if let Some(k) = subject.med("/kib_per_connection_marginal", 1.0) {
                    lines.push(format!("{case}: {k:.1} KiB per idle connection (target ≤ 8 KiB) {}", ok(k <= 8.0)));
                }
            }
        }
    }
    println!("\n### Targets ({})\n", a.subject);
    if lines.is_empty() {
        println!("no {} results in this run", a.subject);
    }
    for l in lines {
        println!("- {l}");
    }
}

/// Cross-instance fan-out against one instance on the same storage (issue 13): paced p99 at
/// most 2 ms above, unpaced deliveries/s at least half.
fn cluster_targets(cases: &BTreeMap<String, BTreeMap<(usize, String), Group>>, a: &ReportArgs) {
    let mut lines = Vec::new();
    for (case, groups) in cases {
        let get = |label: &str| groups.iter().find(|((_, l), _)| l == label).map(|(_, g)| g);
        let (Some(cluster), Some(single)) = (get(&a.cluster), get(&a.single)) else { continue };
        if cluster.scenario != "fanout" {
            continue;
        }
        let paced = cluster.runs[0]["rate_per_writer"].as_f64().unwrap_or(0.0) > 0.0;
        let p99 = |g: &Group| g.med("/latency_ms/p99", 1.0);
        let d = |g: &Group| g.med("/deliveries_per_s", 1.0);
        if paced {
            if let (Some(c), Some(s)) = (p99(cluster), p99(single)) {
                lines.push(format!(
                    "{case}: p99 {c:.2} ms vs {s:.2} ms = +{:.2} ms (target ≤ +2 ms) {}",
                    c - s,
                    ok(c - s <= 2.0)
                ));
            }
        } else if let (Some(c), Some(s)) = (d(cluster), d(single)) {
            lines.push(format!(
                "{case}: deliveries/s {c:.0} vs {s:.0} = {:.0} % (target ≥ 50 %) {}",
                100.0 * c / s.max(1.0),
                ok(c >= 0.5 * s)
            ));
        }
    }
    // The in-run floor: readers on the writers' instance and on the others, same run.
    for (case, groups) in cases {
        let Some(mixed) = groups.iter().find(|((_, l), _)| l == "moai-cluster-mixed").map(|(_, g)| g) else { continue };
        if mixed.scenario != "fanout" || mixed.runs[0]["rate_per_writer"].as_f64().unwrap_or(0.0) <= 0.0 {
            continue;
        }
        let same = mixed.med("/latency_ms_same_instance/p99", 1.0);
        let cross = mixed.med("/latency_ms_cross_instance/p99", 1.0);
        let diffs: Vec<f64> = mixed
            .runs
            .iter()
            .filter_map(|r| {
                Some(
                    r.pointer("/latency_ms_cross_instance/p99")?.as_f64()?
                        - r.pointer("/latency_ms_same_instance/p99")?.as_f64()?,
                )
            })
            .collect();
        if let (Some(s), Some(c), Some(d)) = (same, cross, median(diffs)) {
            lines.push(format!(
                "{case} (moai-cluster-mixed, same run): p99 cross-instance {c:.2} ms vs same-instance {s:.2} ms, median difference +{d:.2} ms (target ≤ +2 ms) {}",
                ok(d <= 2.0)
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!("\n### Targets (cluster: {} vs {})\n", a.cluster, a.single);
    for l in lines {
        println!("- {l}");
    }
}

fn ok(pass: bool) -> &'static str {
    if pass {
        "**PASS**"
    } else {
        "**FAIL**"
    }
}
