//! SSE frames the gateway writes itself: OpenAI `chat.completion.chunk` frames, the usage
//! frame, error events, and the pass-through `data:` framing of upstream payloads.
//!
//! Every string goes through serde_json's escaper; the constant part of a chunk (id, object,
//! created, model) is serialized once per stream and reused as a prefix.

use memchr::memchr;
use serde::Serialize;

pub const DONE: &[u8] = b"data: [DONE]\n\n";
pub const PING: &[u8] = b": ping\n\n";

const CHAT_CHUNK: &str = "chat.completion.chunk";
const TEXT_COMPLETION: &str = "text_completion";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    #[must_use]
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> serde_json::Result<()> {
    serde_json::to_writer(out, value)
}

/// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[` — the rest is per frame.
fn chunk_prefix(id: &str, object: &str, created: i64, model: &str) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + id.len() + model.len());
    out.extend_from_slice(br#"data: {"id":"#);
    put(&mut out, id)?;
    out.extend_from_slice(br#","object":"#);
    put(&mut out, object)?;
    out.extend_from_slice(br#","created":"#);
    put(&mut out, &created)?;
    out.extend_from_slice(br#","model":"#);
    put(&mut out, model)?;
    out.extend_from_slice(br#","choices":["#);
    Ok(out)
}

fn finish_usage(out: &mut Vec<u8>, usage: Usage) -> serde_json::Result<()> {
    out.extend_from_slice(br#"],"usage":"#);
    put(out, &usage)?;
    out.extend_from_slice(b"}\n\n");
    Ok(())
}

/// A final `"choices":[]` frame carrying `usage`.
pub fn usage_frame(
    id: &str,
    object: &str,
    created: i64,
    model: &str,
    usage: Usage,
) -> serde_json::Result<Vec<u8>> {
    let mut out = chunk_prefix(id, object, created, model)?;
    finish_usage(&mut out, usage)?;
    Ok(out)
}

/// Frames an upstream `data` payload unchanged; a multi-line payload (the parser joins data
/// lines with LF) goes out as one `data:` line per line, so it parses back to the same bytes.
pub fn data_frame(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len() + 8);
    out.extend_from_slice(b"data: ");
    let mut rest = data;
    while let Some(lf) = memchr(b'\n', rest) {
        out.extend_from_slice(&rest[..=lf]);
        out.extend_from_slice(b"data: ");
        rest = &rest[lf + 1..];
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(b"\n\n");
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `data: {"error":{"message":..,"type":..,"param":..,"code":..}}` + blank line.
pub fn error_frame(
    message: &str,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"data: ");
    put(
        &mut out,
        &ErrorBody {
            error: ErrorObject {
                message,
                kind,
                param,
                code,
            },
        },
    )?;
    out.extend_from_slice(b"\n\n");
    Ok(out)
}

/// Writes the chunks of one synthesized stream: `chat.completion.chunk` frames (`delta`), or the
/// legacy completions endpoint's `text_completion` frames (`text`, no role frame).
#[derive(Debug, Clone)]
pub struct ChunkEmitter {
    prefix: Vec<u8>,
    completion: bool,
}

impl ChunkEmitter {
    pub fn new(id: &str, model: &str, created: i64) -> serde_json::Result<Self> {
        Ok(Self {
            prefix: chunk_prefix(id, CHAT_CHUNK, created, model)?,
            completion: false,
        })
    }

    /// Frames of `/v1/completions` (`object: text_completion`).
    pub fn new_completion(id: &str, model: &str, created: i64) -> serde_json::Result<Self> {
        Ok(Self {
            prefix: chunk_prefix(id, TEXT_COMPLETION, created, model)?,
            completion: true,
        })
    }

    fn choice(
        &self,
        index: u32,
        extra: usize,
        body: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.prefix.len() + extra + 80);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(br#"{"index":"#);
        put(&mut out, &index)?;
        body(&mut out)?;
        out.extend_from_slice(b"}]}\n\n");
        Ok(out)
    }

    /// The opening role frame; none in a completions stream.
    pub fn role(&self, role: &str, index: u32) -> serde_json::Result<Vec<u8>> {
        if self.completion {
            return Ok(Vec::new());
        }
        self.choice(index, role.len(), |out| {
            out.extend_from_slice(br#","delta":{"role":"#);
            put(out, role)?;
            out.extend_from_slice(br#","content":""},"finish_reason":null"#);
            Ok(())
        })
    }

    pub fn content(&self, text: &str, index: u32) -> serde_json::Result<Vec<u8>> {
        self.choice(index, text.len(), |out| {
            if self.completion {
                out.extend_from_slice(br#","text":"#);
                put(out, text)?;
                out.extend_from_slice(br#","logprobs":null,"finish_reason":null"#);
                return Ok(());
            }
            out.extend_from_slice(br#","delta":{"content":"#);
            put(out, text)?;
            out.extend_from_slice(br#"},"finish_reason":null"#);
            Ok(())
        })
    }

    pub fn finish(&self, reason: &str, index: u32) -> serde_json::Result<Vec<u8>> {
        self.choice(index, reason.len(), |out| {
            if self.completion {
                out.extend_from_slice(br#","text":"","logprobs":null,"finish_reason":"#);
            } else {
                out.extend_from_slice(br#","delta":{},"finish_reason":"#);
            }
            put(out, reason)
        })
    }

    pub fn usage(&self, prompt_tokens: u64, completion_tokens: u64) -> serde_json::Result<Vec<u8>> {
        let mut out = self.prefix.clone();
        finish_usage(&mut out, Usage::new(prompt_tokens, completion_tokens))?;
        Ok(out)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn payload(frame: &[u8]) -> Value {
        let text = std::str::from_utf8(frame).unwrap();
        let body = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        assert!(!body.contains('\n'), "one line per frame: {text:?}");
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn chunk_frames() {
        let e = ChunkEmitter::new("id\"1", "m\n", 7).unwrap();
        let head =
            json!({"id": "id\"1", "object": "chat.completion.chunk", "created": 7, "model": "m\n"});
        let with = |choices: Value| {
            let mut v = head.clone();
            v["choices"] = choices;
            v
        };
        assert_eq!(
            payload(&e.role("assistant", 0).unwrap()),
            with(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])
            )
        );
        let text = "say \"hi\"\n\t\u{1F600}\u{0}\\";
        assert_eq!(
            payload(&e.content(text, 2).unwrap()),
            with(json!([{"index": 2, "delta": {"content": text}, "finish_reason": null}]))
        );
        assert_eq!(
            payload(&e.finish("stop", 0).unwrap()),
            with(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        );
        let mut usage = with(json!([]));
        usage["usage"] = json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7});
        assert_eq!(payload(&e.usage(3, 4).unwrap()), usage);
    }

    #[test]
    fn text_completion_frames() {
        let e = ChunkEmitter::new_completion("cmpl-1", "m", 7).unwrap();
        let head = json!({"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"});
        let with = |choices: Value| {
            let mut v = head.clone();
            v["choices"] = choices;
            v
        };
        assert!(e.role("assistant", 0).unwrap().is_empty());
        assert_eq!(
            payload(&e.content("a \"b\"", 0).unwrap()),
            with(json!([{"index": 0, "text": "a \"b\"", "logprobs": null, "finish_reason": null}]))
        );
        assert_eq!(
            payload(&e.finish("length", 0).unwrap()),
            with(json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}]))
        );
        let mut usage = with(json!([]));
        usage["usage"] = json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3});
        assert_eq!(payload(&e.usage(1, 2).unwrap()), usage);
    }

    #[test]
    fn error_frames() {
        assert_eq!(
            payload(
                &error_frame("bad \"x\"\n", "invalid_request_error", None, Some("model")).unwrap()
            ),
            json!({"error": {"message": "bad \"x\"\n", "type": "invalid_request_error", "param": "model", "code": null}})
        );
    }

    #[test]
    fn data_frames_keep_each_line() {
        let mut out = Vec::new();
        data_frame(&mut out, b"{\"a\":\n1}");
        data_frame(&mut out, b"");
        assert_eq!(out, b"data: {\"a\":\ndata: 1}\n\ndata: \n\n");
    }
}
