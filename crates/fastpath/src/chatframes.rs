//! What the chat-stream translators (`messages::MessagesStream`, `responses::ResponsesStream`)
//! share: splitting the relay's sends into SSE frames, reading a frame (comment, `[DONE]`, a
//! chunk), the chunk's borrowed serde structs and the JSON writing helpers.
//!
//! Each translator keeps its own `Choice`, usage and error structs (their fields and number types
//! follow each Python reference) and plugs them into [`Chunk`].

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
pub(crate) struct Func<'a> {
    #[serde(borrow, default)]
    pub(crate) name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) arguments: Option<Cow<'a, str>>,
}

/// A tool-call delta; `I` is the translator's index type (what its reference accepts).
#[derive(Deserialize)]
pub(crate) struct DeltaCall<'a, I> {
    #[serde(default)]
    pub(crate) index: I,
    #[serde(borrow, default)]
    pub(crate) id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) function: Option<Func<'a>>,
}

impl<I> DeltaCall<'_, I> {
    /// The function name ("" when absent).
    #[inline]
    pub(crate) fn name(&self) -> &str {
        self.function
            .as_ref()
            .and_then(|f| f.name.as_deref())
            .unwrap_or("")
    }

    /// The arguments fragment, when there is a non-empty one.
    #[inline]
    pub(crate) fn arguments(&self) -> Option<&str> {
        self.function
            .as_ref()
            .and_then(|f| f.arguments.as_deref())
            .filter(|a| !a.is_empty())
    }
}

#[derive(Deserialize)]
pub(crate) struct Delta<'a, I> {
    #[serde(borrow, default)]
    pub(crate) content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) tool_calls: Option<Vec<DeltaCall<'a, I>>>,
}

/// A chat chunk, with the translator's choice (`C`), usage (`U`) and error (`E`) structs.
#[derive(Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de>, U: Deserialize<'de>, E: Deserialize<'de>"))]
pub(crate) struct Chunk<C, U, E> {
    #[serde(default)]
    pub(crate) choices: Option<Vec<C>>,
    #[serde(default)]
    pub(crate) usage: Option<U>,
    #[serde(default)]
    pub(crate) error: Option<E>,
}

/// What a frame of the relay's stream asks of a translator.
pub(crate) enum Frame<T> {
    /// `data: [DONE]`
    Done,
    Chunk(T),
}

/// Reads a non-empty frame: a comment (`:` ...: pings, the timing comment) passes through onto
/// `out`; None for that and for what is nothing to translate (not `data: `, not a chunk or not
/// JSON: it never is, from our framers).
#[inline]
pub(crate) fn read_frame<'a, T: Deserialize<'a>>(
    frame: &'a [u8],
    out: &mut Vec<u8>,
) -> Option<Frame<T>> {
    if frame.first() == Some(&b':') {
        out.extend_from_slice(frame);
        out.extend_from_slice(b"\n\n");
        return None;
    }
    let payload = frame.strip_prefix(b"data: ")?;
    if payload == b"[DONE]" {
        return Some(Frame::Done);
    }
    serde_json::from_slice::<T>(payload).ok().map(Frame::Chunk)
}

/// Appends `data` to `buf` (the partial frame kept from the last send), calls `on` with each
/// complete non-empty frame (without its blank line) and keeps the rest in `buf`.
#[inline]
pub(crate) fn each_frame(buf: &mut Vec<u8>, data: &[u8], mut on: impl FnMut(&[u8])) {
    buf.extend_from_slice(data);
    let mut at = 0;
    while let Some(end) = memchr::memmem::find(&buf[at..], b"\n\n") {
        let frame = &buf[at..at + end];
        at += end + 2;
        if !frame.is_empty() {
            on(frame);
        }
    }
    buf.drain(..at);
}

/// A JSON string literal (quotes, escapes) onto `out`.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// An integer (any `Display` number) onto `out`.
#[inline]
pub(crate) fn put_num(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    out.extend_from_slice(n.to_string().as_bytes());
}

/// A string JSON value's text (None for other values: vLLM may name a stop token by its id).
pub(crate) fn raw_str(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

/// The translators' unit-test helpers.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::Value;

    /// The `(event name, data)` pairs of an SSE byte stream (frames without both are left out).
    pub(crate) fn events(raw: &[u8]) -> Vec<(String, Value)> {
        let text = String::from_utf8_lossy(raw);
        text.split("\n\n")
            .filter_map(|block| {
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_owned());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = serde_json::from_str::<Value>(d).ok();
                    }
                }
                Some((name?, data?))
            })
            .collect()
    }

    /// A chat chunk frame of choice 0 with this `delta` JSON.
    pub(crate) fn chunk(delta: &str) -> Vec<u8> {
        format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n")
            .into_bytes()
    }

    /// The sends of a stream with text, then tool call 0 over three chunks (id `call_a`, name `f`,
    /// arguments `{"a":1}`) and call 1 (no id, name `g`), each chunk's frame cut in two sends, and
    /// the `tool_calls` stop and `[DONE]` in the last.
    pub(crate) fn tool_call_sends() -> Vec<Vec<u8>> {
        let mut sends = Vec::new();
        for d in [
            r#"{"content":"Let me see."}"#,
            r#"{"tool_calls":[{"index":0,"id":"call_a","function":{"name":"f","arguments":""}}]}"#,
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}"#,
            r#"{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}"#,
            r#"{"tool_calls":[{"index":1,"function":{"name":"g","arguments":"{}"}}]}"#,
        ] {
            // one frame split in the middle: kept for the next send
            let frame = chunk(d);
            let (a, b) = frame.split_at(frame.len() / 2);
            sends.push(a.to_vec());
            sends.push(b.to_vec());
        }
        sends.push(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n".to_vec());
        sends
    }

    #[test]
    fn frames_split_across_sends() {
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        super::each_frame(&mut buf, b"data: a\n\n\n\n: c", |f| seen.push(f.to_vec()));
        super::each_frame(&mut buf, b"\n\ndata: [DO", |f| seen.push(f.to_vec()));
        assert_eq!(seen, [b"data: a".to_vec(), b": c".to_vec()]);
        assert_eq!(buf, b"data: [DO");
    }
}
