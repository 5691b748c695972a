//! Generated text -> OpenAI `chat.completion.chunk` frames, for upstreams that stream raw text
//! deltas (Triton / TensorRT-LLM `text_output`) instead of OpenAI SSE.
//!
//! Three things make this more than string formatting:
//! * a delta may end inside a multi-byte UTF-8 character (the model decodes token by token), so
//!   incomplete sequences are carried into the next delta, never emitted as U+FFFD early;
//! * TensorRT-LLM keeps the matched stop word in its output, OpenAI does not: text that could be
//!   the start of a stop sequence is held back until it is known not to be one, and a stop
//!   sequence ends the stream before it (wherever it appears, as OpenAI documents);
//! * Triton's raw `BYTES` tensor encoding (u32 little-endian length + bytes, per element) is
//!   parsed here, so Python hands over the protobuf field as it arrived.

use std::fmt;

use crate::emit::ChunkEmitter;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextStreamError {
    /// A `BYTES` tensor whose length prefixes do not add up.
    BadTensor(usize),
    Json(String),
}

impl fmt::Display for TextStreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadTensor(at) => write!(f, "malformed BYTES tensor (length prefix at byte {at})"),
            Self::Json(e) => write!(f, "cannot encode a chunk: {e}"),
        }
    }
}

impl std::error::Error for TextStreamError {}

impl From<serde_json::Error> for TextStreamError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(e.to_string())
    }
}

/// Appends the elements of a raw Triton `BYTES` tensor to `out`.
pub fn bytes_tensor_concat(raw: &[u8], out: &mut Vec<u8>) -> Result<(), TextStreamError> {
    let mut at = 0usize;
    while at < raw.len() {
        let Some(head) = raw.get(at..at + 4) else {
            return Err(TextStreamError::BadTensor(at));
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(head);
        let n = u32::from_le_bytes(len) as usize;
        let start = at + 4;
        let Some(body) = start.checked_add(n).and_then(|end| raw.get(start..end)) else {
            return Err(TextStreamError::BadTensor(at));
        };
        out.extend_from_slice(body);
        at = start + n;
    }
    Ok(())
}

/// Decodes as much of `carry` as is complete UTF-8 into `out`; invalid bytes become U+FFFD, an
/// incomplete sequence at the end stays in `carry` (unless `flush`).
fn drain_utf8(carry: &mut Vec<u8>, out: &mut String, flush: bool) {
    let mut rest: &[u8] = carry;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // `good` is valid by construction; lossy avoids an unwrap.
                out.push_str(&String::from_utf8_lossy(good));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &bad[n..];
                    }
                    None if flush => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = bad;
                        break;
                    }
                }
            }
        }
    }
    let keep = rest.len();
    let from = carry.len() - keep;
    carry.drain(..from);
}

/// Holds back text that could still turn into a stop sequence.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    #[must_use]
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    #[must_use]
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `text`; returns what is now safe to emit. After a stop sequence, nothing more.
    pub fn push(&mut self, text: &str) -> Option<String> {
        if self.stopped {
            return None;
        }
        if self.stops.is_empty() {
            return Some(text.to_owned());
        }
        self.held.push_str(text);
        // Earlier text never holds a whole stop sequence (its possible starts were held back).
        // The stop sequence completed first wins (the earliest end; of those, the longest), as
        // when the text arrives a character at a time: with stops "abc" and "b", "abc" stops
        // after "a" however it was split, not after "" when it came in one delta.
        if let Some((_, at)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at + s.len(), at)))
            .min()
        {
            self.stopped = true;
            self.held.truncate(at);
            return Some(std::mem::take(&mut self.held));
        }
        let keep = self.longest_stop_prefix_suffix();
        let emit_to = self.held.len() - keep;
        let rest = self.held.split_off(emit_to);
        Some(std::mem::replace(&mut self.held, rest))
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop sequence.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let held = self.held.as_str();
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(held.len());
            for k in (best + 1..=max).rev() {
                let from = held.len() - k;
                if held.is_char_boundary(from)
                    && stop.as_bytes().starts_with(&held.as_bytes()[from..])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// The end of the text: whatever was held back is plain text after all.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// One generated-text stream -> chunk frames (role first, content deltas, finish, usage).
#[derive(Debug, Clone)]
pub struct TextStream {
    emitter: Option<ChunkEmitter>,
    stop: StopMatcher,
    carry: Vec<u8>,
    text: String,
}

impl TextStream {
    /// `emitter` None: only collect the text (a non-streamed reply).
    #[must_use]
    pub fn new(emitter: Option<ChunkEmitter>, stops: Vec<String>) -> Self {
        Self {
            emitter,
            stop: StopMatcher::new(stops),
            carry: Vec::new(),
            text: String::new(),
        }
    }

    #[must_use]
    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// Everything emitted so far (stop sequence excluded).
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn role(&self) -> Result<Vec<u8>, TextStreamError> {
        match &self.emitter {
            Some(e) => Ok(e.role("assistant", 0)?),
            None => Ok(Vec::new()),
        }
    }

    /// A raw `BYTES` tensor holding the next delta.
    pub fn push_tensor(&mut self, raw: &[u8]) -> Result<Vec<u8>, TextStreamError> {
        bytes_tensor_concat(raw, &mut self.carry)?;
        self.drain(false)
    }

    pub fn push_bytes(&mut self, delta: &[u8]) -> Result<Vec<u8>, TextStreamError> {
        self.carry.extend_from_slice(delta);
        self.drain(false)
    }

    fn drain(&mut self, flush: bool) -> Result<Vec<u8>, TextStreamError> {
        if self.stop.stopped() {
            self.carry.clear();
            return Ok(Vec::new());
        }
        let mut decoded = String::new();
        drain_utf8(&mut self.carry, &mut decoded, flush);
        let mut ready = self.stop.push(&decoded).unwrap_or_default();
        if flush && !self.stop.stopped() {
            ready.push_str(&self.stop.flush());
        }
        self.emit(&ready)
    }

    fn emit(&mut self, ready: &str) -> Result<Vec<u8>, TextStreamError> {
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        self.text.push_str(ready);
        match &self.emitter {
            Some(e) => Ok(e.content(ready, 0)?),
            None => Ok(Vec::new()),
        }
    }

    /// The end of generation: held-back text, then the finish frame (`stop` after a stop
    /// sequence, else `reason`).
    pub fn finish(&mut self, reason: &str) -> Result<Vec<u8>, TextStreamError> {
        let mut out = self.drain(true)?;
        let reason = if self.stop.stopped() { "stop" } else { reason };
        if let Some(e) = &self.emitter {
            out.extend_from_slice(&e.finish(reason, 0)?);
        }
        Ok(out)
    }

    pub fn usage(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<Vec<u8>, TextStreamError> {
        match &self.emitter {
            Some(e) => Ok(e.usage(prompt_tokens, completion_tokens)?),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tensor(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&u32::try_from(p.len()).unwrap().to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    fn collect(stops: &[&str], deltas: &[&[u8]]) -> (String, bool) {
        let mut s = TextStream::new(None, stops.iter().map(|s| (*s).to_owned()).collect());
        for d in deltas {
            s.push_tensor(&tensor(&[d])).unwrap();
        }
        s.finish("length").unwrap();
        (s.text().to_owned(), s.stopped())
    }

    #[test]
    fn tensors_parse_and_reject_bad_prefixes() {
        let mut out = Vec::new();
        bytes_tensor_concat(&tensor(&[b"ab", b"", b"c"]), &mut out).unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(
            bytes_tensor_concat(&[5, 0, 0, 0, b'a'], &mut out),
            Err(TextStreamError::BadTensor(0))
        );
        assert_eq!(
            bytes_tensor_concat(&[1, 0, 0, 0, b'a', 9], &mut out),
            Err(TextStreamError::BadTensor(5))
        );
        assert_eq!(
            bytes_tensor_concat(&[255, 255, 255, 255], &mut out),
            Err(TextStreamError::BadTensor(0))
        );
    }

    #[test]
    fn utf8_split_across_deltas_is_carried() {
        let smile = "\u{1F600}".as_bytes();
        let (text, _) = collect(&[], &[b"a", &smile[..1], &smile[1..3], &smile[3..], b"b"]);
        assert_eq!(text, "a\u{1F600}b");
        // invalid bytes become U+FFFD, an unfinished sequence at the very end too
        let (text, _) = collect(&[], &[b"x\xffy", &smile[..2]]);
        assert_eq!(text, "x\u{FFFD}y\u{FFFD}");
    }

    #[test]
    fn stop_sequences_are_cut_wherever_they_split() {
        assert_eq!(
            collect(&["END"], &[b"one two E", b"N", b"D three"]),
            ("one two ".into(), true)
        );
        assert_eq!(
            collect(&["END"], &[b"one twoEND"]),
            ("one two".into(), true)
        );
        // a held-back prefix that turns out not to be a stop is emitted, in order
        assert_eq!(
            collect(&["END"], &[b"a E", b"N", b"x"]),
            ("a ENx".into(), false)
        );
        assert_eq!(collect(&["END"], &[b"a EN"]), ("a EN".into(), false));
        // the earliest of several stops wins; empty stops are ignored
        assert_eq!(collect(&["c", "", "b"], &[b"a", b"bc"]), ("a".into(), true));
        // the stop completed first wins, however the text was split
        for deltas in [
            &[&b"xabc"[..]][..],
            &[b"xa", b"bc"],
            &[b"x", b"a", b"b", b"c"],
        ] {
            assert_eq!(collect(&["abc", "b"], deltas), ("xa".into(), true));
            assert_eq!(collect(&["ab", "xab"], deltas), (String::new(), true));
        }
        // multi-byte stop and text
        assert_eq!(
            collect(&["\u{e9}t\u{e9}"], &[b"\xc3\xa9t\xc3", b"\xa9 x"]),
            (String::new(), true)
        );
    }

    #[test]
    fn frames_in_order_and_finish_reason() {
        let e = ChunkEmitter::new("id", "m", 1).unwrap();
        let mut s = TextStream::new(Some(e), vec!["\n\n".into()]);
        assert!(String::from_utf8(s.role().unwrap())
            .unwrap()
            .contains("\"role\":\"assistant\""));
        let f = String::from_utf8(s.push_bytes(b"hi\n").unwrap()).unwrap();
        assert!(f.contains("\"content\":\"hi\""), "{f}");
        assert!(s.push_bytes(b"\nmore").unwrap().is_empty());
        let end = String::from_utf8(s.finish("length").unwrap()).unwrap();
        assert!(end.contains("\"finish_reason\":\"stop\""), "{end}");
        assert_eq!(s.text(), "hi");

        let mut s = TextStream::new(Some(ChunkEmitter::new("id", "m", 1).unwrap()), vec![]);
        s.push_bytes(b"x").unwrap();
        let end = String::from_utf8(s.finish("length").unwrap()).unwrap();
        assert!(end.contains("\"finish_reason\":\"length\""), "{end}");
        assert!(String::from_utf8(s.usage(2, 1).unwrap())
            .unwrap()
            .contains("\"total_tokens\":3"));
    }
}
