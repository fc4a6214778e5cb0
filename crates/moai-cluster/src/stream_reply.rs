//! Reading Redis' stream replies (XREAD, XREVRANGE, XINFO STREAM) from raw values, and the
//! stream entry format moai writes: fields `i` (the publishing instance), `k` (the engine's
//! message kind, one byte) and `d` (the payload).
//!
//! Redis answers in RESP2 arrays or RESP3 maps depending on the connection; both are accepted.
//! Nothing here panics on an unexpected shape: an entry that is not ours is skipped.

use bytes::Bytes;
use redis::Value;

use crate::InstanceId;

/// One entry of a stream, as moai wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: StreamId,
    pub from: InstanceId,
    pub kind: u8,
    pub payload: Bytes,
}

/// A stream entry id `ms-seq`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub(crate) fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The elements of an array, or the flattened pairs of a map.
fn items(v: &Value) -> Option<Vec<&Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a.iter().collect()),
        Value::Map(m) => Some(m.iter().flat_map(|(k, v)| [k, v]).collect()),
        Value::Attribute { data, .. } => items(data),
        _ => None,
    }
}

/// `[id, [field, value, …]]` → an entry, if it has moai's fields.
fn entry(v: &Value) -> (Option<StreamId>, Option<Entry>) {
    let Some(parts) = items(v) else { return (None, None) };
    let Some(id) = parts.first().and_then(|v| bytes(v)).and_then(StreamId::parse) else { return (None, None) };
    let Some(fields) = parts.get(1).and_then(|v| items(v)) else { return (Some(id), None) };
    let (mut from, mut kind, mut payload) = (None, None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        match (bytes(name), bytes(value)) {
            (Some(b"i"), Some(v)) => from = InstanceId::parse(v),
            (Some(b"k"), Some([k])) => kind = Some(*k),
            (Some(b"d"), Some(v)) => payload = Some(Bytes::copy_from_slice(v)),
            _ => {}
        }
    }
    match (from, kind, payload) {
        (Some(from), Some(kind), Some(payload)) => (Some(id), Some(Entry { id, from, kind, payload })),
        _ => (Some(id), None),
    }
}

/// What one stream gave in an XREAD: the last id read (moai's or not) and moai's entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamBatch {
    pub key: Vec<u8>,
    pub last: Option<StreamId>,
    /// Every entry's id, moai's or not.
    pub ids: Vec<StreamId>,
    pub entries: Vec<Entry>,
}

/// An XREAD reply: `nil` (timeout) or, per stream, `[key, [entry, …]]` (RESP3: a map).
pub(crate) fn parse_xread(v: &Value) -> Vec<StreamBatch> {
    let mut out = Vec::new();
    let Some(streams) = (match v {
        Value::Nil => return out,
        Value::Map(m) => Some(m.iter().map(|(k, v)| (k, v)).collect::<Vec<_>>()),
        other => items(other).map(|a| {
            a.iter().filter_map(|s| items(s).and_then(|kv| Some((*kv.first()?, *kv.get(1)?)))).collect::<Vec<_>>()
        }),
    }) else {
        return out;
    };
    for (key, entries) in streams {
        let Some(key) = bytes(key) else { continue };
        let mut batch = StreamBatch { key: key.to_vec(), ..Default::default() };
        for e in items(entries).unwrap_or_default() {
            let (id, parsed) = entry(e);
            if let Some(id) = id {
                batch.last = Some(id);
                batch.ids.push(id);
            }
            batch.entries.extend(parsed);
        }
        out.push(batch);
    }
    out
}

/// What XINFO STREAM says about a stream, as far as gap detection needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamInfo {
    pub length: u64,
    pub last_generated: StreamId,
    /// The highest id removed by XDEL (Redis 7; trimming does not move it).
    pub max_deleted: StreamId,
    /// Entries ever added to the stream (Redis 7).
    pub entries_added: u64,
    /// The oldest entry still in the stream.
    pub first: Option<StreamId>,
}

impl StreamInfo {
    /// A stream that does not exist (never written, or expired): nothing in it, nothing added.
    pub(crate) const MISSING: StreamInfo = StreamInfo {
        length: 0,
        last_generated: StreamId { ms: 0, seq: 0 },
        max_deleted: StreamId { ms: 0, seq: 0 },
        entries_added: 0,
        first: None,
    };

    /// Whether entries after `cursor` were removed before they were read, given that
    /// `added_at_cursor` entries had been added to the stream when it was read up to `cursor`.
    ///
    /// XDEL is visible in `max_deleted`. Trimming removes the oldest entries: if the oldest
    /// remaining entry is still at or before the cursor, nothing after it was trimmed; otherwise
    /// every remaining entry is after the cursor, and more were added after it than remain.
    /// A stream whose ids went backwards was recreated (Redis lost it): a gap as well.
    pub(crate) fn has_gap_after(&self, cursor: StreamId, added_at_cursor: u64) -> bool {
        if self.max_deleted > cursor || self.last_generated < cursor {
            return true;
        }
        let everything_after_cursor = self.first.is_none_or(|first| first > cursor);
        everything_after_cursor && self.entries_added.saturating_sub(added_at_cursor) > self.length
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

/// From an XINFO STREAM reply (RESP2 pairs or a RESP3 map).
pub(crate) fn parse_stream_info(v: &Value) -> Option<StreamInfo> {
    let fields = items(v)?;
    let mut info = StreamInfo::default();
    let (mut last, mut added) = (None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        match bytes(name) {
            Some(b"length") => info.length = int(value)?,
            Some(b"last-generated-id") => last = bytes(value).and_then(StreamId::parse),
            Some(b"max-deleted-entry-id") => info.max_deleted = bytes(value).and_then(StreamId::parse)?,
            Some(b"entries-added") => added = int(value),
            Some(b"first-entry") => info.first = entry(value).0,
            _ => {}
        }
    }
    info.last_generated = last?;
    info.entries_added = added?;
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    fn moai_entry(id: &str, from: InstanceId, kind: u8, d: &[u8]) -> Value {
        Value::Array(vec![
            bulk(id.as_bytes()),
            Value::Array(vec![
                bulk(b"i"),
                bulk(from.to_string().as_bytes()),
                bulk(b"k"),
                bulk(&[kind]),
                bulk(b"d"),
                bulk(d),
            ]),
        ])
    }

    #[test]
    fn xread_replies_in_resp2_and_resp3_shapes() {
        let a = InstanceId(0xabc);
        let entries = Value::Array(vec![
            moai_entry("5-0", a, b'u', b"one"),
            // Not ours: skipped, but its id still moves the cursor.
            Value::Array(vec![bulk(b"6-1"), Value::Array(vec![bulk(b"x"), bulk(b"y")])]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk(b"moai:s:d"), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk(b"moai:s:d"), entries)]);
        for reply in [resp2, resp3] {
            let got = parse_xread(&reply);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].key, b"moai:s:d");
            assert_eq!(got[0].last, Some(StreamId { ms: 6, seq: 1 }));
            assert_eq!(got[0].entries.len(), 1);
            assert_eq!(got[0].entries[0].from, a);
            assert_eq!(got[0].entries[0].kind, b'u');
            assert_eq!(&got[0].entries[0].payload[..], b"one");
        }
        assert!(parse_xread(&Value::Nil).is_empty());
        assert!(parse_xread(&Value::Int(3)).is_empty());
    }

    fn id(ms: u64) -> StreamId {
        StreamId { ms, seq: 0 }
    }

    #[test]
    fn gaps_are_entries_removed_after_the_cursor() {
        // Read up to 5 after 3 entries were added; 2 more were added (6, 7), both still there.
        let info =
            StreamInfo { length: 4, last_generated: id(7), max_deleted: id(0), entries_added: 5, first: Some(id(4)) };
        assert!(!info.has_gap_after(id(5), 3));
        // Trimmed to the last 2: everything left is after the cursor, and all 2 added remain.
        let trimmed = StreamInfo { length: 2, first: Some(id(6)), ..info };
        assert!(!trimmed.has_gap_after(id(5), 3));
        // Trimmed to the last 1: entry 6 was never read.
        let lost = StreamInfo { length: 1, first: Some(id(7)), ..info };
        assert!(lost.has_gap_after(id(5), 3));
        // Emptied entirely after more were added.
        let empty = StreamInfo { length: 0, first: None, ..info };
        assert!(empty.has_gap_after(id(5), 3));
        // Nothing added since the cursor: an empty stream is no gap.
        assert!(!StreamInfo { length: 0, first: None, entries_added: 3, last_generated: id(5), ..info }
            .has_gap_after(id(5), 3));
        // XDEL after the cursor; ids that went backwards.
        assert!(StreamInfo { max_deleted: id(6), ..info }.has_gap_after(id(5), 3));
        assert!(StreamInfo { last_generated: id(2), ..info }.has_gap_after(id(5), 3));
        // A stream that does not exist, read from the start: no gap.
        assert!(!StreamInfo::MISSING.has_gap_after(StreamId::default(), 0));
    }

    #[test]
    fn ids_order_numerically() {
        let a = StreamId::parse(b"9-5").unwrap();
        let b = StreamId::parse(b"10-0").unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "10-0");
        assert_eq!(StreamId::parse(b"10"), None);
        assert_eq!(StreamId::parse(b"a-1"), None);
    }

    #[test]
    fn stream_info() {
        let info = Value::Array(vec![
            bulk(b"length"),
            Value::Int(2),
            bulk(b"last-generated-id"),
            bulk(b"7-0"),
            bulk(b"max-deleted-entry-id"),
            bulk(b"3-0"),
            bulk(b"entries-added"),
            Value::Int(9),
            bulk(b"first-entry"),
            moai_entry("6-0", InstanceId(1), b'u', b""),
        ]);
        let parsed = parse_stream_info(&info).unwrap();
        assert_eq!(
            parsed,
            StreamInfo {
                length: 2,
                last_generated: StreamId { ms: 7, seq: 0 },
                max_deleted: StreamId { ms: 3, seq: 0 },
                entries_added: 9,
                first: Some(StreamId { ms: 6, seq: 0 }),
            }
        );
    }
}
