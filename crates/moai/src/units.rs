//! Parsers for human-friendly flag values: durations ("300ms", "10s", "1h") and byte sizes
//! ("16MiB", "512k", "1048576").

use std::time::Duration;

pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (examples: 300ms, 10s, 1h)"))
}

pub fn bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("invalid size {s:?} (examples: 1048576, 512KiB, 16MiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::bytes("1048576"), Ok(1 << 20));
        assert_eq!(super::bytes("16MiB"), Ok(16 << 20));
        assert_eq!(super::bytes("512k"), Ok(512 << 10));
        assert!(super::bytes("12 parsecs").is_err());
        assert!(super::bytes("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(super::duration("300ms"), Ok(std::time::Duration::from_millis(300)));
        assert!(super::duration("soon").is_err());
    }
}
