//! The subscription's intake: client frames, the per-session limits, and the hello from its
//! arrival to the decision on its position (docs/pgsync-protocol.md §2, §4 `welcome`, §7, §12).

use super::*;
use crate::protocol::{explain_bad_hello, WelcomeMode, PROTOCOL_VERSION};

impl Subscription {
    /// A client frame: parsed here, so bad input is answered by the core.
    pub(super) fn on_text(&mut self, text: String, out: &mut Vec<Action>) {
        if self.state == State::Starting {
            self.early_bytes = self.early_bytes.saturating_add(text.len());
            if self.early.len() >= MAX_EARLY_MESSAGES || self.early_bytes > MAX_EARLY_BYTES {
                let message = format!(
                    "more than {MAX_EARLY_MESSAGES} messages or {MAX_EARLY_BYTES} bytes sent before the server was \
                     ready; wait for the answer to the hello"
                );
                out.extend(self.fail(ErrorCode::BadRequest, &message, true));
                return;
            }
            self.early.push_back(text);
            return;
        }
        match ClientMessage::from_json(&text) {
            Ok(msg) => self.on_client(msg, out),
            // Nothing can happen before a valid hello, so a bad one ends the session with a
            // message naming the offending field instead of leaving the client waiting.
            Err(e) if self.state == State::AwaitHello => {
                let message = match explain_bad_hello(&text) {
                    Some(detail) => format!("invalid hello: {detail}"),
                    None => format!("expected a hello first: {e}"),
                };
                out.extend(self.fail(ErrorCode::BadRequest, &message, true));
            }
            Err(e) => out.extend(self.fail(ErrorCode::BadRequest, &e.to_string(), false)),
        }
    }

    pub(super) fn on_client(&mut self, msg: ClientMessage, out: &mut Vec<Action>) {
        if self.state == State::Starting {
            // Only text frames arrive before readiness in a real session; a parsed message
            // (tests) waits the same way.
            if let Ok(text) = serde_json::to_string(&msg) {
                self.on_text(text, out);
            }
            return;
        }
        // Limits first (shape count, client_id length), before any work for the message.
        if let Some((code, message)) = self.limit_violation(&msg) {
            out.extend(self.fail(code, &message, true));
            return;
        }
        match msg {
            ClientMessage::Hello(h) => {
                if self.state != State::AwaitHello {
                    out.extend(self.fail(ErrorCode::BadRequest, "duplicate hello", false));
                } else {
                    self.on_hello(h, out);
                }
            }
            ClientMessage::Ping { t } => out.push(Action::Send(ServerMessage::Pong { t })),
            ClientMessage::Ack { position } => self.on_ack(position, out),
            ClientMessage::Subscribe { .. } | ClientMessage::Unsubscribe { .. } => {
                out.extend(self.fail(ErrorCode::BadRequest, "subscribe/unsubscribe not supported yet", false))
            }
        }
    }

    fn limit_violation(&self, msg: &ClientMessage) -> Option<(ErrorCode, String)> {
        let (held, asked) = match msg {
            ClientMessage::Hello(h) => {
                if h.client_id.len() > self.cfg.max_client_id_bytes {
                    return Some((
                        ErrorCode::BadRequest,
                        format!(
                            "invalid hello: client_id is {} bytes, at most {} are allowed",
                            h.client_id.len(),
                            self.cfg.max_client_id_bytes
                        ),
                    ));
                }
                // A duplicate hello is refused anyway (non-fatal); it adds no shapes.
                if self.state != State::AwaitHello {
                    return None;
                }
                (0, h.shapes.len())
            }
            ClientMessage::Subscribe { shapes } => (self.shapes.len(), shapes.len()),
            _ => return None,
        };
        (held.saturating_add(asked) > self.cfg.max_shapes).then(|| {
            (
                ErrorCode::TooManyShapes,
                format!(
                    "{} shapes asked for ({held} held + {asked} new); this server allows at most {} per session",
                    held + asked,
                    self.cfg.max_shapes
                ),
            )
        })
    }

    /// Everything about a hello that needs no database; then its tables' columns are looked up.
    fn on_hello(&mut self, h: Hello, out: &mut Vec<Action>) {
        // The token's tables and row predicates become part of the shapes, so the subscription
        // serves exactly what the token allows. Every way a shape can enter a session must pass
        // here (`subscribe`, not implemented yet, too).
        let h = match self.access.restrict_hello(h) {
            Ok(h) => h,
            Err(why) => {
                out.extend(self.fail(ErrorCode::Forbidden, &why, true));
                return;
            }
        };
        if h.protocol != PROTOCOL_VERSION {
            out.extend(self.fail(ErrorCode::BadRequest, "unsupported protocol version", true));
            return;
        }
        let mut shapes = Vec::with_capacity(h.shapes.len());
        for req in &h.shapes {
            match Shape::from_request(req) {
                Ok(s) => shapes.push((req.id.clone(), s)),
                Err(e) => {
                    out.extend(self.fail(ErrorCode::ShapeInvalid, &e.to_string(), true));
                    return;
                }
            }
        }
        if let Some((_, s)) = shapes.iter().find(|(_, s)| !self.cfg.tables.contains(&s.table)) {
            let message = format!("table {} is not synced", s.table);
            out.extend(self.fail(ErrorCode::ShapeInvalid, &message, true));
            return;
        }
        self.shapes = shapes;
        self.state = State::CheckingColumns { hello: h };
        out.push(Action::LookUpColumns(self.tables()));
    }

    /// The catalog's answer: every shape's columns must exist; then the position decides.
    pub(super) fn on_columns(&mut self, columns: Vec<(String, Vec<String>)>, out: &mut Vec<Action>) {
        let State::CheckingColumns { hello } = &self.state else {
            out.extend(self.fail(ErrorCode::Internal, "columns arrived in wrong state", true));
            return;
        };
        let h = hello.clone();
        for (id, shape) in &self.shapes {
            let names: Vec<&str> = columns
                .iter()
                .find(|(t, _)| *t == shape.table)
                .map(|(_, c)| c.iter().map(String::as_str).collect())
                .unwrap_or_default();
            if let Err(e) = shape.validate_columns(&names) {
                let message = format!("shape {id}: {e}");
                out.extend(self.fail(ErrorCode::ShapeInvalid, &message, true));
                return;
            }
        }
        self.decide_position(h, None, out);
    }

    /// Decide what the hello's position gets. `wal_end` is the answer to [`Action::ProbeWal`],
    /// once asked for and known.
    pub(super) fn decide_position(&mut self, h: Hello, wal_end: Option<Lsn>, out: &mut Vec<Action>) {
        if let Some(rows) = h.max_batch_rows {
            self.limit = rows.clamp(1, self.cfg.max_batch_rows.max(1));
        }
        if let Some(w) = h.window {
            self.window = w.max(1);
        }
        let shape_ids: Vec<String> = h.shapes.iter().map(|s| s.id.clone()).collect();
        let registration = |position| Registration {
            client_id: h.client_id.clone(),
            generation: self.generation,
            shapes: h.shapes.clone(),
            position,
        };
        let refetch = match (h.position, h.generation) {
            (None, _) => None,
            (Some(_), g) if g != Some(self.generation) => Some(RefetchReason::GenerationChanged),
            // A position above the watermark is served only once the watermark reaches it:
            // serving it earlier would move the client's position backwards (`up_to_date`
            // reports the lower watermark) or skip changes. Another instance may have issued it
            // from a watermark this one has not seen yet (a replicator's idle watermark is kept
            // in memory; a follower's trails it), so first ask where the WAL ends: every
            // position ever issued lies below the end of the WAL at any later time, so one at or
            // beyond it was never issued by this history.
            (Some(p), _) if p.lsn > self.watermark => {
                match wal_end {
                    Some(end) if p.lsn >= end => {
                        let message = format!(
                            "position (lsn {}, seq {}) is ahead of this server's history (watermark {}, end of WAL {}, \
                             generation {}): it was not issued by this server; drop local data and reconnect with \
                             position null",
                            p.lsn, p.seq, self.watermark, end, self.generation
                        );
                        out.extend(self.fail(ErrorCode::PositionAhead, &message, true));
                    }
                    Some(_) => self.state = State::AwaitingPosition { hello: h, wal_end },
                    None => {
                        self.state = State::AwaitingPosition { hello: h, wal_end: None };
                        out.push(Action::ProbeWal);
                    }
                }
                return;
            }
            // A position at the horizon is still fine: rows above it are all retained.
            (Some(p), _) if p.lsn < self.horizon => Some(RefetchReason::PositionTooOld),
            (Some(p), _) => {
                self.sent = Some(p);
                self.acked = Some(p);
                out.push(Action::Send(ServerMessage::Welcome {
                    generation: self.generation,
                    mode: WelcomeMode::Catchup,
                    watermark: self.watermark,
                }));
                // Accepted: only now may the position hold retention back.
                out.push(Action::Register(registration(Some(p))));
                self.state = State::CatchingUp { upto: self.watermark, stitch: None };
                self.maybe_query(out);
                return;
            }
        };
        if let Some(reason) = refetch {
            out.push(Action::Send(ServerMessage::MustRefetch { reason, shape_ids }));
        }
        out.push(Action::Send(ServerMessage::Welcome {
            generation: self.generation,
            mode: WelcomeMode::Snapshot,
            watermark: self.watermark,
        }));
        // Treated as new: whatever position it sent (too old, another generation) is not kept.
        out.push(Action::Register(registration(None)));
        self.state = State::Snapshotting;
        out.push(Action::TakeSnapshot { shapes: self.shapes.clone(), batch_rows: self.limit });
    }
}
