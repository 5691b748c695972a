//! OpenAI chat stream frames -> Anthropic Messages stream events, for a Messages client.
//!
//! The relay sends OpenAI frames (chunks, the usage chunk, `[DONE]`, its error event, pings,
//! comments); this turns each send into Anthropic's events: `message_start` (first), then per
//! delta `content_block_start` / `content_block_delta` (`text_delta`, `input_json_delta` for tool
//! calls, split over as many chunks as the upstream split them) / `content_block_stop`, and at
//! `[DONE]` `message_delta` (stop reason, usage) and `message_stop`; an error event becomes
//! Anthropic's `error` event and ends the stream. Choice 0 only. Each payload is read once by
//! serde with borrowed strings: no allocation for a delta without escapes.
//! `gateway/anthropic_stream.py` (`ChatToMessages`) is the Python reference, tested equal.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chatframes::{self, each_frame, put_num, put_str, raw_str, read_frame, Delta, Frame};

#[derive(Debug)]
pub struct MessagesStream {
    msg_id: String,
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    stops: Vec<String>,
    buf: Vec<u8>,
    out: Vec<u8>,
    started: bool,
    ended: bool,
    /// the open content block, and whether it is a text block
    open: Option<(u64, bool)>,
    next_block: u64,
    /// OpenAI tool-call index -> Anthropic block index
    calls: Vec<(u64, u64)>,
    finish: Option<String>,
    matched: Option<String>,
}

type DeltaCall<'a> = chatframes::DeltaCall<'a, u64>;
type Chunk<'a> = chatframes::Chunk<Choice<'a>, UsageIn, ErrorIn<'a>>;

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<Delta<'a, u64>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    /// vLLM: the stop string that ended the text (or a token id)
    #[serde(borrow, default)]
    stop_reason: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageIn {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorIn<'a> {
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
}

const PING: &[u8] = b"event: ping\ndata: {\"type\":\"ping\"}\n\n";

/// OpenAI finish_reason (+ the matched stop string) -> Anthropic stop_reason, stop_sequence.
#[must_use]
pub fn stop_reason<'s>(
    finish: Option<&str>,
    matched: Option<&'s str>,
    stops: &[String],
) -> (&'static str, Option<&'s str>) {
    match finish.unwrap_or("stop") {
        "stop" => match matched {
            Some(m) if stops.iter().any(|s| s == m) => ("stop_sequence", Some(m)),
            _ => ("end_turn", None),
        },
        "length" => ("max_tokens", None),
        "tool_calls" | "function_call" => ("tool_use", None),
        "content_filter" => ("refusal", None),
        _ => ("end_turn", None),
    }
}

/// The Anthropic error type of a gateway error event (`type`, `code`): no capacity or an
/// unavailable upstream is `overloaded_error`, as Anthropic says it.
#[must_use]
pub fn error_type(kind: Option<&str>, code: Option<&str>) -> &'static str {
    if let Some(
        "upstream_unavailable" | "upstream_capacity" | "limiter_unavailable" | "guard_unavailable",
    ) = code
    {
        return "overloaded_error";
    }
    match kind.unwrap_or("") {
        "invalid_request_error" => "invalid_request_error",
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "not_found_error" => "not_found_error",
        "rate_limit_error" => "rate_limit_error",
        "timeout_error" => "timeout_error",
        _ => "api_error",
    }
}

impl MessagesStream {
    #[must_use]
    pub fn new(msg_id: &str, model: &str, input_tokens: u64, stops: Vec<String>) -> Self {
        Self {
            msg_id: msg_id.to_owned(),
            model: model.to_owned(),
            input_tokens,
            output_tokens: 0,
            stops,
            buf: Vec::new(),
            out: Vec::new(),
            started: false,
            ended: false,
            open: None,
            next_block: 0,
            calls: Vec::new(),
            finish: None,
            matched: None,
        }
    }

    /// Translates one send; the returned bytes are valid until the next call.
    pub fn feed(&mut self, data: &[u8]) -> &[u8] {
        self.out.clear();
        if !self.started {
            self.start();
        }
        let mut buf = std::mem::take(&mut self.buf);
        each_frame(&mut buf, data, |frame| {
            if !self.ended {
                self.frame(frame);
            }
        });
        self.buf = buf;
        &self.out
    }

    fn event(&mut self, name: &[u8]) {
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b"\ndata: ");
    }

    fn start(&mut self) {
        self.started = true;
        self.event(b"message_start");
        self.out
            .extend_from_slice(b"{\"type\":\"message_start\",\"message\":{\"id\":");
        let (id, model) = (self.msg_id.clone(), self.model.clone());
        put_str(&mut self.out, &id);
        self.out.extend_from_slice(
            b",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":",
        );
        put_str(&mut self.out, &model);
        self.out.extend_from_slice(
            b",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":",
        );
        put_num(&mut self.out, self.input_tokens);
        self.out.extend_from_slice(b",\"output_tokens\":0}}}\n\n");
    }

    fn close(&mut self) {
        if let Some((i, _)) = self.open.take() {
            self.event(b"content_block_stop");
            self.out
                .extend_from_slice(b"{\"type\":\"content_block_stop\",\"index\":");
            put_num(&mut self.out, i);
            self.out.extend_from_slice(b"}\n\n");
        }
    }

    /// Closes the open block and starts the next: `block` is its JSON (written by `write`).
    fn open_block(&mut self, text: bool, write: impl FnOnce(&mut Vec<u8>)) -> u64 {
        self.close();
        let i = self.next_block;
        self.next_block += 1;
        self.open = Some((i, text));
        self.event(b"content_block_start");
        self.out
            .extend_from_slice(b"{\"type\":\"content_block_start\",\"index\":");
        put_num(&mut self.out, i);
        self.out.extend_from_slice(b",\"content_block\":");
        write(&mut self.out);
        self.out.extend_from_slice(b"}\n\n");
        i
    }

    fn delta(&mut self, i: u64, kind: &[u8], field: &[u8], value: &str) {
        self.event(b"content_block_delta");
        self.out
            .extend_from_slice(b"{\"type\":\"content_block_delta\",\"index\":");
        put_num(&mut self.out, i);
        self.out.extend_from_slice(b",\"delta\":{\"type\":\"");
        self.out.extend_from_slice(kind);
        self.out.extend_from_slice(b"\",\"");
        self.out.extend_from_slice(field);
        self.out.extend_from_slice(b"\":");
        put_str(&mut self.out, value);
        self.out.extend_from_slice(b"}}\n\n");
    }

    fn frame(&mut self, frame: &[u8]) {
        if frame == b": ping" {
            self.out.extend_from_slice(PING);
            return;
        }
        match read_frame::<Chunk<'_>>(frame, &mut self.out) {
            Some(Frame::Done) => self.end(),
            Some(Frame::Chunk(chunk)) => self.chunk(chunk),
            None => {}
        }
    }

    fn chunk(&mut self, c: Chunk<'_>) {
        if let Some(err) = c.error {
            self.ended = true;
            let code = err.code.and_then(raw_str);
            let kind = error_type(err.kind.as_deref(), code.as_deref());
            self.event(b"error");
            self.out
                .extend_from_slice(b"{\"type\":\"error\",\"error\":{\"type\":\"");
            self.out.extend_from_slice(kind.as_bytes());
            self.out.extend_from_slice(b"\",\"message\":");
            put_str(&mut self.out, err.message.as_deref().unwrap_or(""));
            self.out.extend_from_slice(b"}}\n\n");
            return;
        }
        if let Some(u) = c.usage {
            self.input_tokens = u.prompt_tokens.unwrap_or(0);
            self.output_tokens = u.completion_tokens.unwrap_or(0);
        }
        for choice in c.choices.unwrap_or_default() {
            if choice.index != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                    let i = match self.open {
                        Some((i, true)) => i,
                        _ => self.open_block(true, |out| {
                            out.extend_from_slice(b"{\"type\":\"text\",\"text\":\"\"}");
                        }),
                    };
                    self.delta(i, b"text_delta", b"text", text);
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.tool_call(&call);
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(reason.into_owned());
                self.matched = choice.stop_reason.and_then(raw_str);
            }
        }
    }

    fn tool_call(&mut self, call: &DeltaCall<'_>) {
        let known = self
            .calls
            .iter()
            .find(|(k, _)| *k == call.index)
            .map(|&(_, i)| i);
        let i = if let Some(i) = known {
            i
        } else {
            let name = call.name();
            let generated;
            let id = if let Some(id) = call.id.as_deref() {
                id
            } else {
                generated = format!("toolu_{}_{}", self.msg_id, call.index);
                &generated
            };
            let i = self.open_block(false, |out| {
                out.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
                put_str(out, id);
                out.extend_from_slice(b",\"name\":");
                put_str(out, name);
                out.extend_from_slice(b",\"input\":{}}");
            });
            self.calls.push((call.index, i));
            i
        };
        if let Some(args) = call.arguments() {
            self.delta(i, b"input_json_delta", b"partial_json", args);
        }
    }

    fn end(&mut self) {
        self.ended = true;
        self.close();
        let (reason, sequence) =
            stop_reason(self.finish.as_deref(), self.matched.as_deref(), &self.stops);
        let sequence = sequence.map(str::to_owned);
        self.event(b"message_delta");
        self.out
            .extend_from_slice(b"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"");
        self.out.extend_from_slice(reason.as_bytes());
        self.out.extend_from_slice(b"\",\"stop_sequence\":");
        match sequence {
            Some(s) => put_str(&mut self.out, &s),
            None => self.out.extend_from_slice(b"null"),
        }
        self.out
            .extend_from_slice(b"},\"usage\":{\"input_tokens\":");
        put_num(&mut self.out, self.input_tokens);
        self.out.extend_from_slice(b",\"output_tokens\":");
        put_num(&mut self.out, self.output_tokens);
        self.out.extend_from_slice(b"}}\n\n");
        self.event(b"message_stop");
        self.out
            .extend_from_slice(b"{\"type\":\"message_stop\"}\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chatframes::testing::{chunk, events, tool_call_sends};
    use serde_json::Value;

    #[test]
    fn text_stream() {
        let mut s = MessagesStream::new("msg_1", "m\"x", 9, vec![]);
        let mut out = s
            .feed(&chunk(r#"{"role":"assistant","content":""}"#))
            .to_vec();
        out.extend_from_slice(s.feed(&chunk(r#"{"content":"Hel"}"#)));
        out.extend_from_slice(s.feed(&chunk(r#"{"content":"lo \"q\"\n\u0001"}"#)));
        out.extend_from_slice(s.feed(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n: x-cost\n\ndata: [DONE]\n\n",
        ));
        let ev = events(&out);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(ev[0].1["message"]["model"], "m\"x");
        assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 9);
        assert_eq!(ev[3].1["delta"]["text"], "lo \"q\"\n\u{1}");
        assert_eq!(ev[5].1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(ev[5].1["usage"]["input_tokens"], 3);
        assert_eq!(ev[5].1["usage"]["output_tokens"], 2);
        assert!(String::from_utf8_lossy(&out).contains(": x-cost\n\n"));
    }

    #[test]
    fn tool_calls_split_and_parallel() {
        let mut s = MessagesStream::new("msg_1", "m", 1, vec![]);
        let mut out = Vec::new();
        for send in tool_call_sends() {
            out.extend_from_slice(s.feed(&send));
        }
        let ev = events(&out);
        let starts: Vec<&Value> = ev
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .map(|(_, d)| &d["content_block"])
            .collect();
        assert_eq!(starts[0]["type"], "text");
        assert_eq!(starts[1]["id"], "call_a");
        assert_eq!(starts[2]["id"], "toolu_msg_1_1");
        assert_eq!(starts[2]["name"], "g");
        let json: String = ev
            .iter()
            .filter(|(n, d)| n == "content_block_delta" && d["index"] == 1)
            .filter_map(|(_, d)| d["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(json, r#"{"a":1}"#);
        let stop = ev.iter().find(|(n, _)| n == "message_delta");
        assert_eq!(
            stop.map(|(_, d)| d["delta"]["stop_reason"].clone()),
            Some(Value::from("tool_use"))
        );
    }

    #[test]
    fn errors_pings_and_stop_sequences() {
        let mut s = MessagesStream::new("msg_1", "m", 1, vec!["END".to_owned()]);
        let out = s
            .feed(b": ping\n\ndata: {\"error\":{\"message\":\"gone\",\"type\":\"upstream_error\",\"code\":\"upstream_unavailable\"}}\n\ndata: [DONE]\n\n")
            .to_vec();
        let ev = events(&out);
        assert_eq!(ev[1].0, "ping");
        assert_eq!(ev[2].0, "error");
        assert_eq!(ev[2].1["error"]["type"], "overloaded_error");
        assert_eq!(ev.len(), 3); // nothing after the error
        let mut s = MessagesStream::new("msg_1", "m", 1, vec!["END".to_owned()]);
        let out = s
            .feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\",\"stop_reason\":\"END\"}]}\n\ndata: not json\n\ndata: [DONE]\n\n")
            .to_vec();
        let ev = events(&out);
        let md = &ev[ev.len() - 2].1;
        assert_eq!(md["delta"]["stop_reason"], "stop_sequence");
        assert_eq!(md["delta"]["stop_sequence"], "END");
        assert_eq!(error_type(Some("weird"), None), "api_error");
        assert_eq!(
            stop_reason(Some("stop"), Some("x"), &[]),
            ("end_turn", None)
        );
    }
}
