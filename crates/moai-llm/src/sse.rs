//! Server-sent events as the passthrough sees them: the upstream's bytes are cut into events at
//! blank lines, each event kept byte for byte as received (line endings, comments, fields the
//! proxy does not know), and only looked at to count usage and notice `[DONE]` and errors.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::observer::Usage;

/// Cuts a byte stream into whole events. An event is everything up to and including the blank
/// line that ends it; `\n`, `\r\n` and `\r` all end a line, as the SSE format says.
#[derive(Default)]
pub(crate) struct EventSplitter {
    buf: BytesMut,
    /// Where scanning resumes in `buf`.
    pos: usize,
    /// Where the line being scanned starts.
    line_start: usize,
}

impl EventSplitter {
    /// Adds `chunk` and returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut i = self.pos;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b != b'\n' && b != b'\r' {
                i += 1;
                continue;
            }
            let ending = match (b, self.buf.get(i + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A `\r` last in the buffer may be half of `\r\n`: wait for the next byte.
                (b'\r', None) => break,
                _ => 1,
            };
            let blank = i == self.line_start;
            i += ending;
            self.line_start = i;
            if blank {
                events.push(self.buf.split_to(i).freeze());
                i = 0;
                self.line_start = 0;
            }
        }
        self.pos = i;
        events
    }

    /// Bytes of the event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// What is left at the end of the stream (an event the upstream did not end with a blank
    /// line), if anything.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.pos = 0;
        self.line_start = 0;
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

/// What an event means to the proxy.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// `data: [DONE]`: the stream is complete.
    Done,
    /// `data: {"error": …}`: the upstream failed mid-stream.
    Error,
    /// A chunk that carries usage; `usage_only` when it has no choices (the chunk that
    /// `stream_options.include_usage` adds).
    Usage { usage: Usage, usage_only: bool },
    /// Anything else: content, comments, keep-alives.
    Other,
}

/// Reads an event's `data` (its `data:` lines joined with `\n`) and classifies it. JSON is
/// parsed only when the data mentions `usage` or `error`, so content chunks cost one scan.
pub(crate) fn inspect(event: &[u8]) -> Seen {
    let Some(data) = data_of(event) else { return Seen::Other };
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return Seen::Done;
    }
    if !contains(data, b"\"usage\"") && !contains(data, b"\"error\"") {
        return Seen::Other;
    }
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else { return Seen::Other };
    if chunk.get("error").is_some_and(|e| !e.is_null()) {
        return Seen::Error;
    }
    match chunk.get("usage").and_then(Usage::from_json) {
        Some(usage) => {
            let usage_only = chunk.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty());
            Seen::Usage { usage, usage_only }
        }
        None => Seen::Other,
    }
}

fn data_of(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in lines(event) {
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => continue, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            let d = data.get_or_insert_with(Vec::new);
            if !d.is_empty() {
                d.push(b'\n');
            }
            d.extend_from_slice(value);
        }
    }
    data
}

fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).flat_map(|l| l.split(|b| *b == b'\r'))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The event the proxy sends when the stream fails after it started:
/// `data: {"error":{"message":…,"type":…,"code":…}}` (the shape OpenAI's SDKs raise from).
pub(crate) fn error_event(message: &str, code: &str) -> Bytes {
    let body = serde_json::json!({ "error": { "message": message, "type": "proxy_error", "code": code } });
    Bytes::from(format!("data: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(pieces: &[&[u8]]) -> (Vec<Bytes>, Option<Bytes>) {
        let mut s = EventSplitter::default();
        let mut out = Vec::new();
        for p in pieces {
            out.extend(s.push(p));
        }
        (out, s.finish())
    }

    #[test]
    fn events_are_cut_at_blank_lines_and_kept_byte_for_byte() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\r\n\r\ndata: x\rdata: y\r\rdata: [DONE]\n\n";
        let (events, rest) = split_all(&[stream]);
        assert_eq!(
            events,
            [&b"data: {\"a\":1}\n\n"[..], b": keep-alive\r\n\r\n", b"data: x\rdata: y\r\r", b"data: [DONE]\n\n"]
        );
        assert_eq!(rest, None);
        // Any split of the same bytes gives the same events.
        for cut in 1..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(split_all(&[a, b]).0, events, "cut at {cut}");
        }
        let one_by_one: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(split_all(&one_by_one).0, events);
    }

    #[test]
    fn an_unfinished_event_is_returned_at_the_end() {
        let (events, rest) = split_all(&[b"data: 1\n\ndata: [DONE]\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(rest.as_deref(), Some(&b"data: [DONE]\n"[..]));
        assert_eq!(inspect(&rest.unwrap()), Seen::Done);
    }

    #[test]
    fn events_are_classified() {
        assert_eq!(inspect(b"data: [DONE]\n\n"), Seen::Done);
        assert_eq!(inspect(b"data:[DONE]\r\n\r\n"), Seen::Done);
        assert_eq!(inspect(b": OPENROUTER PROCESSING\n\n"), Seen::Other);
        assert_eq!(inspect(b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n"), Seen::Other);
        assert_eq!(inspect(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"), Seen::Error);
        assert_eq!(inspect(b"data: {\"choices\":[],\"usage\":null}\n\n"), Seen::Other);
        assert_eq!(
            inspect(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n"),
            Seen::Usage { usage: Usage { prompt_tokens: 7, completion_tokens: 3 }, usage_only: true }
        );
        // Usage on a content chunk (some upstreams do that), data split over two lines.
        assert_eq!(
            inspect(b"data: {\"choices\":[{}],\ndata: \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n"),
            Seen::Usage { usage: Usage { prompt_tokens: 1, completion_tokens: 2 }, usage_only: false }
        );
        assert_eq!(inspect(b"event: ping\n\n"), Seen::Other);
    }

    #[test]
    fn error_events_are_json_with_a_message() {
        let e = error_event("the \"upstream\" stalled", "idle_timeout");
        let text = std::str::from_utf8(&e).unwrap();
        assert!(text.starts_with("data: ") && text.ends_with("\n\n"));
        let v: Value = serde_json::from_str(&text[6..]).unwrap();
        assert_eq!(v["error"]["message"], "the \"upstream\" stalled");
        assert_eq!(v["error"]["code"], "idle_timeout");
    }
}
