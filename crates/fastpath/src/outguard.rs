//! The output guard: PII / secret policy over a reply's text, and the stream filter that applies
//! it to OpenAI chunk frames on their way to the client.
//!
//! The filter sits between an adapter's framer and the client: it takes the frames of one
//! upstream read and returns the frames to send. Text deltas are held back by a bounded window
//! (`window` bytes, extended to the start of a trailing run of non-whitespace and of any
//! finding that reaches into the window), so a finding split across reads is seen whole before
//! any of it leaves: with patterns of at most 64 bytes (or without whitespace), a window of 64+
//! bytes is enough. Frames that carry no text pass byte for byte; text frames are re-serialized
//! from the last text frame of their choice. Tool-call frames are held until the call's
//! arguments are complete (a client cannot use half of them), then scanned and sent as one frame
//! per call. A finding of a `block` kind stops the filter (`blocked`): the relay ends the stream
//! with an error event, and none of the held text goes out.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::emit;
use crate::pii::{self, Detector, Hit, Kind};
use crate::sse::{Event, Parser, SseError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Flag,
    Redact,
    Block,
}

impl Action {
    #[must_use]
    pub fn parse(name: &str) -> Option<Action> {
        match name {
            "flag" => Some(Action::Flag),
            "redact" => Some(Action::Redact),
            "block" => Some(Action::Block),
            _ => None,
        }
    }
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Action::Flag => "flag",
            Action::Redact => "redact",
            Action::Block => "block",
        }
    }
}

/// One finding acted on: which kind, under which guard (its index in the config), what was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: Kind,
    pub guard: u32,
    pub action: Action,
}

/// The kinds to look for and, per kind, the action and the guard that asked (the strongest
/// action wins when guards overlap). Built once per worker; shared by every request's filter.
#[derive(Debug)]
pub struct Policy {
    det: Detector,
    rules: [Option<(Action, u32)>; 8],
}

/// A scanned text: the text to send (redacted), the findings acted on, the first block.
#[derive(Debug, Default)]
pub struct Scanned {
    pub text: String,
    pub findings: Vec<Finding>,
    pub blocked: Option<Finding>,
}

impl Policy {
    pub fn new(rules: &[(Kind, Action, u32)]) -> Result<Self, String> {
        let mut table: [Option<(Action, u32)>; 8] = [None; 8];
        for &(kind, action, guard) in rules {
            let slot = &mut table[kind as usize];
            if slot.is_none_or(|(a, _)| action > a) {
                *slot = Some((action, guard));
            }
        }
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| table[*k as usize].is_some())
            .collect();
        Ok(Self {
            det: Detector::new(&kinds)?,
            rules: table,
        })
    }

    fn finding(&self, kind: Kind) -> Finding {
        let (action, guard) = self.rules[kind as usize].unwrap_or((Action::Flag, 0));
        Finding {
            kind,
            guard,
            action,
        }
    }

    /// A whole text (a unary reply's content, a tool call's arguments).
    #[must_use]
    pub fn scan_text(&self, text: &str) -> Scanned {
        let (out, hits) = pii::redact(&self.det, text, |k| {
            self.rules[k as usize].is_some_and(|(a, _)| a == Action::Redact)
        });
        let mut s = Scanned {
            text: out,
            ..Scanned::default()
        };
        for h in hits {
            let f = self.finding(h.kind);
            if f.action == Action::Block && s.blocked.is_none() {
                s.blocked = Some(f);
            }
            s.findings.push(f);
        }
        s
    }
}

/// Held text past this many bytes goes out even inside a run without whitespace (a long
/// base64 blob): the hold-back stays bounded.
const MAX_HOLD: usize = 4096;
/// After a private key's BEGIN line is masked, the text is dropped up to its END line; this much
/// of the dropped tail is kept to find an END line split across reads.
const KEY_TAIL: usize = 64;

#[derive(Debug, Default)]
struct ToolBuf {
    index: u64,
    /// The frame the call first appeared in, its `tool_calls` cut to this call.
    frame: Value,
    args: String,
}

#[derive(Debug, Default)]
struct ChoiceBuf {
    pending: String,
    /// The last text frame of this choice (text emptied, no role): the shape re-emitted text takes.
    template: Option<Value>,
    /// The text is `delta.content` (chat), else `text` (completions).
    in_delta: bool,
    in_key: bool,
    tools: Vec<ToolBuf>,
}

#[derive(Debug)]
struct State {
    policy: Arc<Policy>,
    window: usize,
    choices: Vec<ChoiceBuf>,
    hits: Vec<Hit>,
    out: Vec<u8>,
    findings: Vec<Finding>,
    blocked: Option<Finding>,
}

#[derive(Debug)]
pub struct OutputFilter {
    parser: Parser,
    st: State,
}

impl OutputFilter {
    #[must_use]
    pub fn new(policy: Arc<Policy>, window: usize, max_event_bytes: usize) -> Self {
        Self {
            parser: Parser::new(max_event_bytes),
            st: State {
                policy,
                window: window.max(64),
                choices: Vec::new(),
                hits: Vec::new(),
                out: Vec::new(),
                findings: Vec::new(),
                blocked: None,
            },
        }
    }

    /// The frames of one upstream read -> the frames to send now (valid until the next call).
    pub fn feed(&mut self, frames: &[u8]) -> Result<&[u8], SseError> {
        let st = &mut self.st;
        st.out.clear();
        self.parser
            .feed(frames, &mut |e: &Event<'_>| st.on_data(e.data))?;
        for i in 0..st.choices.len() {
            st.release(i, false);
        }
        Ok(&self.st.out)
    }

    /// The upstream ended: everything still held, scanned to its end.
    pub fn finish(&mut self) -> &[u8] {
        let st = &mut self.st;
        st.out.clear();
        self.parser.flush(&mut |e: &Event<'_>| st.on_data(e.data));
        for i in 0..st.choices.len() {
            st.flush(i);
        }
        &self.st.out
    }

    #[must_use]
    pub fn blocked(&self) -> Option<Finding> {
        self.st.blocked
    }
    #[must_use]
    pub fn findings(&self) -> &[Finding] {
        &self.st.findings
    }
    /// Text bytes held back right now (for the benchmark's delay figure).
    #[must_use]
    pub fn held(&self) -> usize {
        self.st.choices.iter().map(|c| c.pending.len()).sum()
    }
}

fn choice_mut(v: &mut Value) -> Option<&mut Map<String, Value>> {
    v.get_mut("choices")?.get_mut(0)?.as_object_mut()
}

fn set_text(frame: &mut Value, in_delta: bool, text: &str) {
    let Some(c) = choice_mut(frame) else { return };
    if in_delta {
        if let Some(d) = c.get_mut("delta").and_then(Value::as_object_mut) {
            d.insert("content".into(), Value::String(text.into()));
        }
    } else {
        c.insert("text".into(), Value::String(text.into()));
    }
}

/// Inside a masked private key: drops `pending` up to its END line (true: found, go on with the
/// rest) or keeps a tail to find an END line split across reads (false).
fn skip_key(det: &Detector, cb: &mut ChoiceBuf, pending: &mut String, last: bool) -> bool {
    if let Some(end) = det.key_block_end(pending, 0) {
        pending.drain(..end);
        cb.in_key = false;
        return true;
    }
    if !last {
        let keep = floor_char(pending, pending.len().saturating_sub(KEY_TAIL));
        pending.drain(..keep);
        cb.pending = std::mem::take(pending);
    }
    false
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl State {
    fn choice(&mut self, idx: usize) -> Option<&mut ChoiceBuf> {
        if idx >= 64 {
            return None;
        }
        if self.choices.len() <= idx {
            self.choices.resize_with(idx + 1, ChoiceBuf::default);
        }
        self.choices.get_mut(idx)
    }

    fn emit_value(&mut self, v: &Value) {
        if let Ok(bytes) = serde_json::to_vec(v) {
            emit::data_frame(&mut self.out, &bytes);
        }
    }

    fn on_data(&mut self, data: &[u8]) {
        if self.blocked.is_some() {
            return;
        }
        let parsed = serde_json::from_slice::<Value>(data).ok();
        let Some(mut v) = parsed.filter(|v| {
            v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.len() == 1)
        }) else {
            // usage-only frames, errors, anything else: what is held goes out first
            for i in 0..self.choices.len() {
                self.flush(i);
            }
            emit::data_frame(&mut self.out, data);
            return;
        };
        let idx = v
            .pointer("/choices/0/index")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let Some(idx) = usize::try_from(idx).ok().filter(|i| *i < 64) else {
            emit::data_frame(&mut self.out, data);
            return;
        };
        let finishing = v
            .pointer("/choices/0/finish_reason")
            .is_some_and(|r| !r.is_null())
            || v.get("usage").is_some_and(|u| !u.is_null());
        let mut changed = false;
        // the text: taken out of the frame into the choice's pending text
        let (text, in_delta) = match v.pointer("/choices/0/delta/content") {
            Some(Value::String(s)) => (s.clone(), true),
            _ => match v.pointer("/choices/0/text") {
                Some(Value::String(s)) => (s.clone(), false),
                _ => (String::new(), true),
            },
        };
        if !text.is_empty() {
            set_text(&mut v, in_delta, "");
            changed = true;
            let mut template = v.clone();
            if let Some(c) = choice_mut(&mut template) {
                if let Some(d) = c.get_mut("delta").and_then(Value::as_object_mut) {
                    d.remove("role");
                    d.remove("tool_calls");
                }
                c.insert("finish_reason".into(), Value::Null);
                c.remove("logprobs");
            }
            if let Some(o) = template.as_object_mut() {
                o.remove("usage");
            }
            let Some(cb) = self.choice(idx) else { return };
            cb.pending.push_str(&text);
            cb.in_delta = in_delta;
            cb.template = Some(template);
        }
        // tool calls: held until complete
        let calls = v
            .pointer_mut("/choices/0/delta/tool_calls")
            .map(Value::take);
        let mut held_tools = false;
        if let Some(Value::Array(calls)) = calls {
            held_tools = !calls.is_empty();
            changed = true;
            for call in calls {
                self.hold_tool(idx, &v, call);
            }
        }
        if finishing {
            self.flush(idx);
        }
        // what is left of the frame, if anything
        if !changed {
            emit::data_frame(&mut self.out, data);
            return;
        }
        let delta_empty = v
            .pointer("/choices/0/delta")
            .and_then(Value::as_object)
            .is_none_or(|d| {
                d.iter().all(|(k, x)| {
                    x.is_null() || (k == "content" && x.as_str() == Some("")) || k == "tool_calls"
                })
            });
        let text_empty = v
            .pointer("/choices/0/text")
            .is_none_or(|t| t.as_str() == Some("") || t.is_null());
        if finishing || !(delta_empty && text_empty) || (!held_tools && text.is_empty()) {
            if let Some(d) = v
                .pointer_mut("/choices/0/delta")
                .and_then(Value::as_object_mut)
            {
                if d.get("tool_calls").is_some_and(Value::is_null) {
                    d.remove("tool_calls");
                }
            }
            self.emit_value(&v);
        }
    }

    fn hold_tool(&mut self, idx: usize, frame: &Value, mut call: Value) {
        let ti = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let piece = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let Some(cb) = self.choice(idx) else { return };
        if let Some(t) = cb.tools.iter_mut().find(|t| t.index == ti) {
            t.args.push_str(&piece);
            return;
        }
        if let Some(f) = call.get_mut("function").and_then(Value::as_object_mut) {
            f.insert("arguments".into(), Value::String(String::new()));
        }
        let mut f = frame.clone();
        if let Some(c) = choice_mut(&mut f) {
            c.insert("finish_reason".into(), Value::Null);
            if let Some(d) = c.get_mut("delta").and_then(Value::as_object_mut) {
                d.remove("content");
                d.insert("tool_calls".into(), Value::Array(vec![call]));
            }
        }
        if let Some(o) = f.as_object_mut() {
            o.remove("usage");
        }
        cb.tools.push(ToolBuf {
            index: ti,
            frame: f,
            args: piece,
        });
    }

    /// Everything held for choice `i` goes out (scanned to its end): text, then tool calls.
    fn flush(&mut self, i: usize) {
        self.release(i, true);
        let tools = match self.choices.get_mut(i) {
            Some(cb) => std::mem::take(&mut cb.tools),
            None => return,
        };
        for mut t in tools {
            let s = self.policy.scan_text(&t.args);
            self.note(&s.findings);
            if self.blocked.is_some() {
                return;
            }
            if let Some(f) = t
                .frame
                .pointer_mut("/choices/0/delta/tool_calls/0/function")
                .and_then(Value::as_object_mut)
            {
                f.insert("arguments".into(), Value::String(s.text));
            }
            self.emit_value(&t.frame);
        }
    }

    fn note(&mut self, findings: &[Finding]) {
        for f in findings {
            if f.action == Action::Block {
                if self.blocked.is_none() {
                    self.blocked = Some(*f);
                }
            } else {
                self.findings.push(*f);
            }
        }
    }

    /// Sends what of choice `i`'s held text is safe now (`last`: all of it).
    fn release(&mut self, i: usize, last: bool) {
        if self.blocked.is_some() {
            return;
        }
        let Some(cb) = self.choices.get_mut(i) else {
            return;
        };
        if cb.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut cb.pending);
        let in_delta = cb.in_delta;
        if cb.in_key && !skip_key(&self.policy.det, cb, &mut pending, last) {
            return;
        }
        let policy = Arc::clone(&self.policy);
        let mut hits = std::mem::take(&mut self.hits);
        policy.det.scan(&pending, &mut hits);
        if let Some(h) = hits
            .iter()
            .find(|h| policy.finding(h.kind).action == Action::Block)
        {
            self.blocked = Some(policy.finding(h.kind));
            self.hits = hits;
            return;
        }
        let mut cut = pending.len();
        if !last {
            let base = floor_char(&pending, pending.len().saturating_sub(self.window));
            cut = match pending[..base].rfind(char::is_whitespace) {
                Some(ws) => ws + pending[ws..].chars().next().map_or(1, char::len_utf8),
                None if pending.len() > MAX_HOLD => base,
                None => 0,
            };
            for h in &hits {
                if h.end > cut && h.start < cut {
                    cut = h.start;
                }
            }
        }
        let mut send = String::with_capacity(cut);
        let mut pos = 0;
        let mut rest_from = cut;
        let mut into_key = false;
        for h in hits
            .iter()
            .filter(|h| h.end <= cut || (last && h.start < cut))
        {
            if h.start < pos {
                continue;
            }
            let f = policy.finding(h.kind);
            send.push_str(pending.get(pos..h.start).unwrap_or(""));
            self.findings.push(f);
            if f.action == Action::Redact {
                send.push_str(&pii::mask(h.kind));
                pos = h.end;
                if h.kind == Kind::PrivateKey {
                    if let Some(end) = policy.det.key_block_end(&pending, h.end) {
                        pos = end;
                        rest_from = rest_from.max(end);
                    } else {
                        into_key = true;
                        rest_from = pending.len();
                        break;
                    }
                }
            } else {
                send.push_str(pending.get(h.start..h.end).unwrap_or(""));
                pos = h.end;
            }
        }
        if !into_key {
            send.push_str(pending.get(pos..cut.max(pos)).unwrap_or(""));
        }
        self.hits = hits;
        let rest = pending.get(rest_from.max(cut)..).unwrap_or("").to_owned();
        let Some(cb) = self.choices.get_mut(i) else {
            return;
        };
        cb.pending = rest;
        cb.in_key = into_key;
        if send.is_empty() {
            return;
        }
        if let Some(mut frame) = cb.template.clone() {
            set_text(&mut frame, in_delta, &send);
            self.emit_value(&frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: Action) -> Arc<Policy> {
        let rules: Vec<(Kind, Action, u32)> = Kind::ALL.iter().map(|k| (*k, action, 0)).collect();
        Arc::new(Policy::new(&rules).unwrap_or_else(|e| unreachable!("{e}")))
    }

    fn frame(text: &str) -> Vec<u8> {
        let v = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
        let mut out = Vec::new();
        emit::data_frame(&mut out, &serde_json::to_vec(&v).unwrap_or_default());
        out
    }

    fn finish_frame() -> Vec<u8> {
        let v = serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let mut out = Vec::new();
        emit::data_frame(&mut out, &serde_json::to_vec(&v).unwrap_or_default());
        out
    }

    fn text_of(frames: &[u8]) -> String {
        let mut text = String::new();
        let mut p = Parser::new(1 << 20);
        p.feed(frames, &mut |e: &Event<'_>| {
            if let Ok(v) = serde_json::from_slice::<Value>(e.data) {
                if let Some(s) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    text.push_str(s);
                }
            }
        })
        .unwrap_or_default();
        text
    }

    fn run(p: &Arc<Policy>, parts: &[&str]) -> (String, Option<Finding>, usize) {
        let mut f = OutputFilter::new(Arc::clone(p), 64, 1 << 20);
        let mut sent = Vec::new();
        for part in parts {
            sent.extend_from_slice(f.feed(&frame(part)).unwrap_or_default());
        }
        sent.extend_from_slice(f.feed(&finish_frame()).unwrap_or_default());
        sent.extend_from_slice(f.finish());
        (text_of(&sent), f.blocked(), f.findings().len())
    }

    #[test]
    fn redacts_a_finding_split_at_every_offset() {
        let p = policy(Action::Redact);
        let text = "Reach me at jane.doe@example.com or 4111 1111 1111 1111, thanks.";
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            let (out, blocked, n) = run(&p, &[a, b]);
            assert_eq!(
                out, "Reach me at [REDACTED:email] or [REDACTED:card], thanks.",
                "cut {cut}"
            );
            assert!(blocked.is_none());
            assert_eq!(n, 2);
        }
    }

    #[test]
    fn blocks_before_sending() {
        let p = policy(Action::Block);
        let (out, blocked, _) = run(&p, &["my key: AKIAIOS", "FODNN7EXAMPLE ok"]);
        assert!(blocked.is_some_and(|f| f.kind == Kind::ApiKey));
        assert!(!out.contains("AKIA"), "{out}");
    }

    #[test]
    fn clean_text_passes_and_private_keys_are_dropped_whole() {
        let p = policy(Action::Redact);
        let words: Vec<String> = (0..50).map(|i| format!("word{i} ")).collect();
        let parts: Vec<&str> = words.iter().map(String::as_str).collect();
        let (out, _, n) = run(&p, &parts);
        assert_eq!(out, words.concat());
        assert_eq!(n, 0);
        let (out, _, _) = run(
            &p,
            &[
                "a -----BEGIN RSA PRIV",
                "ATE KEY-----\nMIIEow",
                "IBAAKCAQEA\n-----END RSA",
                " PRIVATE KEY----- b",
            ],
        );
        assert_eq!(out, "a [REDACTED:private_key] b");
    }

    #[test]
    fn flag_keeps_text() {
        let p = policy(Action::Flag);
        let (out, blocked, n) = run(&p, &["SSN 123-45-", "6789 end"]);
        assert_eq!(out, "SSN 123-45-6789 end");
        assert!(blocked.is_none());
        assert_eq!(n, 1);
    }
}
