//! Sans-IO response parsing: HTTP/1.1 response head, body framing (Content-Length, chunked,
//! until-close) and SSE event splitting, each fed whatever bytes one `read` returned together with
//! the instant that read completed. An SSE event is timestamped with the read that delivered its
//! last byte, so TTFT and inter-token latencies are taken when bytes arrive, however the server
//! or the kernel split them.

use fastpath::sse::{Event, Parser};
use memchr::{memchr, memmem};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Head(&'static str),
    Chunk(&'static str),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Head(m) => write!(f, "bad response head: {m}"),
            ParseError::Chunk(m) => write!(f, "bad chunked body: {m}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
    pub event_stream: bool,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

/// Parse a response head from the start of `buf`; `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ParseError> {
    let Some(end) = memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(ParseError::Head("head larger than 64 KiB"));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| ParseError::Head("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(ParseError::Head("not HTTP/1.x"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::Head("bad status code"))?;
    let mut keep_alive = version == "HTTP/1.1";
    let mut length = None;
    let mut chunked = false;
    let mut event_stream = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Head("header line without ':'"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| ParseError::Head("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            event_stream = value.to_ascii_lowercase().starts_with("text/event-stream");
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        framing,
        keep_alive,
        event_stream,
        len: end + 4,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Incremental `Transfer-Encoding: chunked` decoder.
#[derive(Debug)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for Dechunker {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            line: Vec::with_capacity(32),
        }
    }
}

impl Dechunker {
    #[must_use]
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feed raw bytes; payload slices go to `out`. Returns the bytes consumed (less than
    /// `input.len()` only once the terminating chunk and trailers are complete).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut impl FnMut(&[u8]),
    ) -> Result<usize, ParseError> {
        let total = input.len();
        while !input.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(total - input.len()),
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(nl) = memchr(b'\n', input) else {
                        self.push_line(input)?;
                        return Ok(total);
                    };
                    self.push_line(&input[..nl])?;
                    input = &input[nl + 1..];
                    let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
                            let size = parse_hex(hex)?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => {
                            return Err(ParseError::Chunk("missing CRLF after data"))
                        }
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer,
                    };
                    self.line.clear();
                }
                ChunkState::Data(left) => {
                    let n = (left.min(input.len() as u64)) as usize;
                    out(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                }
            }
        }
        Ok(total)
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<(), ParseError> {
        if self.line.len() + bytes.len() > 4096 {
            return Err(ParseError::Chunk(
                "chunk-size or trailer line longer than 4 KiB",
            ));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }
}

fn parse_hex(hex: &[u8]) -> Result<u64, ParseError> {
    let hex = hex.trim_ascii();
    if hex.is_empty() || hex.len() > 15 {
        return Err(ParseError::Chunk("bad chunk size"));
    }
    let mut v = 0u64;
    for &b in hex {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err(ParseError::Chunk("bad chunk size")),
        };
        v = v * 16 + u64::from(d);
    }
    Ok(v)
}

/// Splits a byte stream into SSE events and hands each event's joined `data:` payload to a
/// callback (comments, `event:`/`id:` fields and data-less events are skipped).
///
/// The gateway's own WHATWG parser (`fastpath::sse`) underneath: CR, LF and CRLF line ends, a
/// BOM, and bytes split anywhere. The HTTP framing above (head, chunked body) stays here: the
/// gateway's core has none, its server does that part.
#[derive(Debug)]
pub struct SseSplitter(Parser);

impl Default for SseSplitter {
    fn default() -> Self {
        // No size limit: a response's events are bounded by the response, and the bench keeps
        // only the current one (`feed` cannot fail).
        Self(Parser::new(usize::MAX))
    }
}

impl SseSplitter {
    pub fn feed(&mut self, input: &[u8], on_event: &mut impl FnMut(&[u8])) {
        // The parser fails only past its size limit, which is usize::MAX here.
        let _ = self.0.feed(input, &mut |e: &Event<'_>| on_event(e.data));
    }
}

/// What one SSE `data:` payload of an OpenAI stream means to the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventInfo {
    pub done: bool,
    /// Carries generated output (content, reasoning, completion text or tool-call arguments).
    pub content: bool,
    pub error: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize, Default)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

fn non_empty(s: Option<&String>) -> bool {
    s.is_some_and(|s| !s.is_empty())
}

/// Classify one event payload; undecodable JSON counts as an error event.
#[must_use]
pub fn classify(data: &[u8]) -> EventInfo {
    classify_into(data, None)
}

/// [`classify`], also appending the event's generated text (content, reasoning, completion
/// text; not tool-call arguments) to `text`, for counting output tokens when `usage` is missing.
#[must_use]
pub fn classify_into(data: &[u8], text: Option<&mut String>) -> EventInfo {
    if data.trim_ascii() == b"[DONE]" {
        return EventInfo {
            done: true,
            ..EventInfo::default()
        };
    }
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
        return EventInfo {
            error: true,
            ..EventInfo::default()
        };
    };
    let content = chunk.choices.iter().any(|c| {
        non_empty(c.text.as_ref())
            || c.delta.as_ref().is_some_and(|d| {
                non_empty(d.content.as_ref())
                    || non_empty(d.reasoning_content.as_ref())
                    || non_empty(d.reasoning.as_ref())
                    || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
            })
    });
    if let Some(out) = text {
        for c in &chunk.choices {
            for s in [c.text.as_ref()]
                .into_iter()
                .chain(c.delta.as_ref().map_or([None; 3], |d| {
                    [
                        d.content.as_ref(),
                        d.reasoning_content.as_ref(),
                        d.reasoning.as_ref(),
                    ]
                }))
                .flatten()
            {
                out.push_str(s);
            }
        }
    }
    let usage = chunk.usage.unwrap_or_default();
    EventInfo {
        done: false,
        content,
        error: chunk.error.is_some(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn split_all(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut s = SseSplitter::default();
        let mut events = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            s.feed(&bytes[last..c], &mut |e: &[u8]| events.push(e.to_vec()));
            last = c;
        }
        events
    }

    const STREAM: &[u8] =
        b": ping\n\ndata: {\"a\":1}\n\nevent: x\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\r\r";

    #[test]
    fn sse_events_are_the_same_however_bytes_are_split() {
        let whole = split_all(STREAM, &[]);
        assert_eq!(
            whole,
            vec![
                b"{\"a\":1}".to_vec(),
                b"one\ntwo".to_vec(),
                b"[DONE]".to_vec()
            ]
        );
        for i in 0..=STREAM.len() {
            for j in i..=STREAM.len() {
                assert_eq!(split_all(STREAM, &[i, j]), whole, "cuts {i} {j}");
            }
        }
        let bytewise: Vec<usize> = (1..STREAM.len()).collect();
        assert_eq!(split_all(STREAM, &bytewise), whole);
    }

    #[test]
    fn event_is_emitted_by_the_read_that_completes_it() {
        let mut s = SseSplitter::default();
        let mut n = 0;
        s.feed(b"data: x\n", &mut |_: &[u8]| n += 1);
        assert_eq!(n, 0);
        s.feed(b"\n", &mut |_: &[u8]| n += 1);
        assert_eq!(n, 1);
    }

    fn dechunk(bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, bool, usize) {
        let mut d = Dechunker::default();
        let mut out = Vec::new();
        let mut last = 0;
        let mut consumed = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            consumed += d
                .feed(&bytes[last..c], &mut |b: &[u8]| out.extend_from_slice(b))
                .unwrap_or(0);
            last = c;
        }
        (out, d.done(), consumed)
    }

    #[test]
    fn dechunker_handles_any_split_and_stops_at_the_end() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for i in 0..=body.len() {
            let (out, done, consumed) = dechunk(body, &[i]);
            assert_eq!(out, b"hello, world", "cut {i}");
            assert!(done);
            assert_eq!(consumed, end, "cut {i}");
        }
        let mut d = Dechunker::default();
        assert!(d.feed(b"zz\r\n", &mut |_: &[u8]| {}).is_err());
        let mut d = Dechunker::default();
        assert!(d.feed(b"1\r\nabc\r\n", &mut |_: &[u8]| {}).is_err());
    }

    #[test]
    fn head_parsing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive && h.event_stream);
        assert_eq!(h.len, raw.len() - 4);
        let h =
            parse_head(b"HTTP/1.1 429 Too Many\r\ncontent-length: 12\r\nconnection: close\r\n\r\n")
                .ok()
                .flatten();
        assert_eq!(
            h.map(|h| (h.status, h.framing, h.keep_alive)),
            Some((429, Framing::Length(12), false))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-"), Ok(None));
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
    }

    #[test]
    fn classify_openai_chunks() {
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert!(!classify(role).content);
        let word = br#"{"choices":[{"index":0,"delta":{"content":"hi \"x\""}}],"usage":null}"#;
        assert!(classify(word).content);
        let legacy = br#"{"choices":[{"text":"w1","index":0}]}"#;
        assert!(classify(legacy).content);
        let tool =
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#;
        assert!(classify(tool).content);
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        let u = classify(usage);
        assert_eq!(
            (u.content, u.prompt_tokens, u.completion_tokens),
            (false, Some(7), Some(3))
        );
        assert!(classify(b"[DONE]").done);
        let mut text = String::new();
        for e in [&word[..], legacy, tool, usage, role] {
            let _ = classify_into(e, Some(&mut text));
        }
        assert_eq!(text, "hi \"x\"w1");
        assert!(classify(b"{not json").error);
        assert!(classify(br#"{"error":{"message":"boom"}}"#).error);
    }
}
