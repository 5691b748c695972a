//! Incremental WHATWG `text/event-stream` parser: bytes split anywhere in, whole events out.
//!
//! Upstream reads end at arbitrary byte offsets (mid-line, mid-UTF-8, between CR and LF), so
//! the parser keeps only the unfinished line and the event being built, and hands each finished
//! event to a callback as borrowed slices: the re-framer's hot path allocates nothing per event.

use std::fmt;

use memchr::{memchr, memchr2};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One pending line or event grew beyond the parser's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseError {
    pub limit: usize,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SSE event larger than the limit of {} bytes", self.limit)
    }
}

impl std::error::Error for SseError {}

/// A dispatched event, valid for the duration of the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event` field; `None` when absent or empty (the spec's default type, "message").
    pub event: Option<&'a str>,
    /// The `data` lines joined with LF, as received (decode as UTF-8, lossily).
    pub data: &'a [u8],
    /// The last event ID: it persists across events per the spec; `None` until an `id` field.
    pub id: Option<&'a str>,
    /// A valid `retry` field of this event's block.
    pub retry: Option<u64>,
}

#[derive(Debug)]
pub struct Parser {
    max_event_bytes: usize,
    /// The unfinished line (no terminator in it); before `started`, the possible BOM.
    line: Vec<u8>,
    /// `data` values, each followed by LF.
    data: Vec<u8>,
    event_type: String,
    last_id: Option<String>,
    retry: Option<u64>,
    /// The last line ended with CR at the end of a feed: an LF opening the next one is its tail.
    after_cr: bool,
    /// The first bytes have been checked for a BOM.
    started: bool,
}

impl Parser {
    #[must_use]
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            line: Vec::new(),
            data: Vec::new(),
            event_type: String::new(),
            last_id: None,
            retry: None,
            after_cr: false,
            started: false,
        }
    }

    /// Bytes held for an incomplete line or event.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.line.len() + self.data.len() + self.event_type.len()
    }

    /// Parses `chunk`, calling `on_event` for every event it completes. After an error the
    /// pending event is dropped; the stream is corrupt and should be abandoned.
    pub fn feed<F: FnMut(&Event<'_>)>(
        &mut self,
        chunk: &[u8],
        on_event: &mut F,
    ) -> Result<(), SseError> {
        if self.started {
            return self.feed_lines(chunk, on_event);
        }
        // Hold back the first bytes until it is known whether they are a BOM.
        let take = (BOM.len() - self.line.len()).min(chunk.len());
        let (head, rest) = chunk.split_at(take);
        self.line.extend_from_slice(head);
        if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
            return Ok(());
        }
        self.started = true;
        let first = std::mem::take(&mut self.line);
        self.feed_lines(first.strip_prefix(BOM).unwrap_or(&first), on_event)?;
        self.feed_lines(rest, on_event)
    }

    /// End of stream for a lenient consumer: dispatches a pending event whose `data` lines were
    /// all terminated (only the blank line is missing); an unterminated last line is dropped.
    pub fn flush<F: FnMut(&Event<'_>)>(&mut self, on_event: &mut F) {
        self.dispatch(on_event);
        self.reset();
    }

    /// End of stream per the spec: a pending, unterminated event is discarded.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_event_bytes);
    }

    fn feed_lines<F: FnMut(&Event<'_>)>(
        &mut self,
        mut rest: &[u8],
        on_event: &mut F,
    ) -> Result<(), SseError> {
        if self.after_cr {
            match rest.first() {
                None => return Ok(()),
                Some(b'\n') => rest = &rest[1..],
                Some(_) => {}
            }
            self.after_cr = false;
        }
        while let Some(end) = memchr2(b'\n', b'\r', rest) {
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let tail = &rest[..end];
            if self.line.is_empty() {
                self.check(tail.len())?;
                self.process_line(tail, on_event);
            } else {
                self.check(self.line.len() + tail.len())?;
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(tail);
                self.process_line(&line, on_event);
                line.clear();
                self.line = line; // keep the allocation
            }
            rest = &rest[next..];
        }
        self.check(self.line.len() + rest.len())?;
        self.line.extend_from_slice(rest);
        Ok(())
    }

    /// Errors if `incoming` more bytes would take the pending event past the limit.
    fn check(&mut self, incoming: usize) -> Result<(), SseError> {
        if self.data.len() + self.event_type.len() + incoming <= self.max_event_bytes {
            return Ok(());
        }
        self.line.clear();
        self.data.clear();
        self.event_type.clear();
        self.retry = None;
        Err(SseError {
            limit: self.max_event_bytes,
        })
    }

    fn process_line<F: FnMut(&Event<'_>)>(&mut self, line: &[u8], on_event: &mut F) {
        let (field, value) = match memchr(b':', line) {
            _ if line.is_empty() => return self.dispatch(on_event),
            Some(0) => return, // a comment
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => {
                self.event_type.clear();
                self.event_type.push_str(&String::from_utf8_lossy(value));
            }
            b"id" if memchr(0, value).is_none() => {
                let id = self.last_id.get_or_insert_with(String::new);
                id.clear();
                id.push_str(&String::from_utf8_lossy(value));
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // All ASCII digits: valid UTF-8; a value beyond u64 is ignored.
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch<F: FnMut(&Event<'_>)>(&mut self, on_event: &mut F) {
        if self.data.pop().is_some() {
            // Popped the LF after the last data line.
            on_event(&Event {
                event: (!self.event_type.is_empty()).then_some(self.event_type.as_str()),
                data: &self.data,
                id: self.last_id.as_deref(),
                retry: self.retry,
            });
        }
        self.data.clear();
        self.event_type.clear();
        self.retry = None;
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    type Owned = (Option<String>, String, Option<String>, Option<u64>);

    fn parse_chunks(chunks: &[&[u8]], limit: usize) -> Result<Vec<Owned>, SseError> {
        let mut p = Parser::new(limit);
        let mut out = Vec::new();
        for chunk in chunks {
            p.feed(chunk, &mut |e: &Event<'_>| {
                out.push((
                    e.event.map(str::to_owned),
                    String::from_utf8_lossy(e.data).into_owned(),
                    e.id.map(str::to_owned),
                    e.retry,
                ));
            })?;
        }
        p.reset();
        assert_eq!(p.buffered(), 0);
        Ok(out)
    }

    fn parse(bytes: &[u8]) -> Vec<Owned> {
        parse_chunks(&[bytes], 1 << 20).unwrap()
    }

    fn ev(event: Option<&str>, data: &str, id: Option<&str>, retry: Option<u64>) -> Owned {
        (
            event.map(str::to_owned),
            data.to_owned(),
            id.map(str::to_owned),
            retry,
        )
    }

    const STREAM: &[u8] = b"\xEF\xBB\xBF: hello\r\ndata: a\r\ndata:b\r\r\
        event: upd\nid: 7\nretry: 150\ndata\n\n\
        data:  two spaces\rid: x\x00y\n\
        event: ignored\n\n\
        retry: 12a\ndata: \xE2\x82\xAC\r\n\r\n\
        data: tail-without-blank-line\n";

    #[test]
    fn whatwg_fields() {
        assert_eq!(
            parse(STREAM),
            vec![
                ev(None, "a\nb", None, None),
                ev(Some("upd"), "", Some("7"), Some(150)),
                ev(Some("ignored"), " two spaces", Some("7"), None),
                ev(None, "\u{20ac}", Some("7"), None),
            ]
        );
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let whole = parse(STREAM);
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                let got =
                    parse_chunks(&[&STREAM[..i], &STREAM[i..j], &STREAM[j..]], 1 << 20).unwrap();
                assert_eq!(got, whole, "split at {i}, {j}");
            }
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(parse_chunks(&bytes, 1 << 20).unwrap(), whole);
    }

    #[test]
    fn cr_then_lf_in_next_feed_is_one_line_end() {
        let got = parse_chunks(&[b"data: x\r", b"\n", b"\r", b"\ndata: y\n\n"], 99).unwrap();
        assert_eq!(
            got,
            vec![ev(None, "x", None, None), ev(None, "y", None, None)]
        );
    }

    #[test]
    fn bom_only_at_start_and_only_once() {
        assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), vec![]); // field name is "\u{feff}data"
        assert_eq!(
            parse(b"data: \xEF\xBB\xBF\n\n"),
            vec![ev(None, "\u{feff}", None, None)]
        );
        assert_eq!(
            parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata:1\n\n"], 9).unwrap(),
            vec![ev(None, "1", None, None)]
        );
        assert_eq!(parse_chunks(&[b"\xEF", b"data:1\n\n"], 9).unwrap(), vec![]);
        assert_eq!(
            parse_chunks(&[b"d", b"ata:1\n\n"], 9).unwrap(),
            vec![ev(None, "1", None, None)]
        );
    }

    #[test]
    fn limit_applies_to_lines_and_events() {
        assert!(parse_chunks(&[b"data: 0123456789"], 10).is_err());
        assert!(parse_chunks(&[b"data: 0123\n", b"data: 4567\n"], 14).is_err());
        assert!(parse_chunks(&[b"data: 0123\n\ndata: 4567\n\n"], 12).is_ok());
        let mut p = Parser::new(8);
        assert_eq!(
            p.feed(b"data: 0123456789", &mut |_| {}),
            Err(SseError { limit: 8 })
        );
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn flush_dispatches_only_terminated_data() {
        let mut p = Parser::new(64);
        let mut seen = Vec::new();
        p.feed(b"data: a\ndata: b", &mut |_| {}).unwrap();
        p.flush(&mut |e: &Event<'_>| seen.push(e.data.to_vec()));
        assert_eq!(seen, vec![b"a".to_vec()]);
        assert_eq!(p.buffered(), 0);
    }
}
