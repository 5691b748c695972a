//! OpenAI chat stream frames -> Responses API stream events, for a `/v1/responses` client.
//!
//! The relay sends OpenAI frames (chunks, the usage chunk, `[DONE]`, its error event, pings,
//! comments); this turns each send into the Responses API's events: `response.created` and
//! `response.in_progress` (first), text as a `message` item (`response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`), each tool call as a
//! `function_call` item (`response.function_call_arguments.delta`, split over as many chunks as
//! the upstream split them); at `[DONE]` the open items close (`*.done` events) and
//! `response.completed` (`response.incomplete` on a length or content-filter stop) carries the
//! whole response object, kept (`response`) for the dialect to store before that send goes out.
//! An error event becomes `error` + `response.failed`. Comments and pings pass through. Every
//! event has `type` and `sequence_number`. Choice 0 only. Each payload is read once by serde with
//! borrowed strings. `gateway/responses_stream.py` (`ChatToResponses`) is the Python reference,
//! tested equal; field types follow its msgspec structs (a chunk they refuse is skipped here too).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chatframes::{self, each_frame, put_num, put_str, raw_str, read_frame, Delta, Frame};

type DeltaCall<'a> = chatframes::DeltaCall<'a, i64>;
type Chunk<'a> = chatframes::Chunk<Choice<'a>, UsageIn, ErrorIn<'a>>;

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: i64,
    #[serde(borrow, default)]
    delta: Option<Delta<'a, i64>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

/// Absent counts are 0, a `null` one refuses the chunk (as the reference's `int = 0` does).
#[derive(Deserialize)]
struct UsageIn {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
}

#[derive(Deserialize)]
struct ErrorIn<'a> {
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
}

#[derive(Debug)]
struct Call {
    index: i64,
    id: String,
    name: String,
    /// its item id, `"fc_<tail>_<index>"` (a JSON string, rendered once)
    fc_id: Vec<u8>,
    /// its output index
    out: usize,
    args: String,
}

/// Why the response object could not be built from the request's parts.
#[derive(Debug, PartialEq, Eq)]
pub struct EchoError;

impl std::fmt::Display for EchoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("echo must be a JSON object")
    }
}

impl std::error::Error for EchoError {}

#[derive(Debug)]
pub struct ResponsesStream {
    /// the response id without `resp_`: the items' ids derive from it
    tail: String,
    /// `{"id":..,"object":"response","created_at":..,"status":"`
    head: Vec<u8>,
    /// `,"model":..,"output":[`
    model: Vec<u8>,
    /// `],"previous_response_id":..,"usage":`
    prev: Vec<u8>,
    /// `,` + the request's echo fields + `}`
    echo: Vec<u8>,
    /// `"msg_<tail>"` (a JSON string)
    msg_id: Vec<u8>,
    seq: u64,
    prompt: i64,
    completion: i64,
    finish: Option<String>,
    /// output items in order, each rendered when it closes
    output: Vec<Option<Vec<u8>>>,
    /// the open message item's output index
    msg_out: Option<usize>,
    text: String,
    calls: Vec<Call>,
    /// the open call (a position in `calls`)
    open: Option<usize>,
    buf: Vec<u8>,
    out: Vec<u8>,
    started: bool,
    done: bool,
    status: Option<&'static str>,
    response: Option<Vec<u8>>,
}

/// The Responses API's incomplete reason of an OpenAI finish_reason (None: complete).
#[must_use]
pub fn incomplete_reason(finish: Option<&str>) -> Option<&'static str> {
    match finish {
        Some("length") => Some("max_output_tokens"),
        Some("content_filter") => Some("content_filter"),
        _ => None,
    }
}

impl ResponsesStream {
    /// `echo` is the request's echo of the response object (`ResponsesRequest.echo`, a JSON
    /// object: its fields follow `usage`).
    pub fn new(
        response_id: &str,
        model: &str,
        created_at: i64,
        previous_response_id: Option<&str>,
        echo: &[u8],
        prompt_tokens: i64,
    ) -> Result<Self, EchoError> {
        let raw = serde_json::from_slice::<&RawValue>(echo).map_err(|_| EchoError)?;
        let fields = raw
            .get()
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .map(str::trim)
            .ok_or(EchoError)?;
        let tail: String = response_id.chars().skip(5).collect();
        let mut head = b"{\"id\":".to_vec();
        put_str(&mut head, response_id);
        head.extend_from_slice(b",\"object\":\"response\",\"created_at\":");
        put_num(&mut head, created_at);
        head.extend_from_slice(b",\"status\":\"");
        let mut model_part = b",\"model\":".to_vec();
        put_str(&mut model_part, model);
        model_part.extend_from_slice(b",\"output\":[");
        let mut prev = b"],\"previous_response_id\":".to_vec();
        match previous_response_id {
            Some(p) => put_str(&mut prev, p),
            None => prev.extend_from_slice(b"null"),
        }
        prev.extend_from_slice(b",\"usage\":");
        let mut echo_part = Vec::with_capacity(fields.len() + 2);
        if !fields.is_empty() {
            echo_part.push(b',');
            echo_part.extend_from_slice(fields.as_bytes());
        }
        echo_part.push(b'}');
        let mut msg_id = Vec::new();
        put_str(&mut msg_id, &format!("msg_{tail}"));
        Ok(Self {
            tail,
            head,
            model: model_part,
            prev,
            echo: echo_part,
            msg_id,
            seq: 0,
            prompt: prompt_tokens,
            completion: 0,
            finish: None,
            output: Vec::new(),
            msg_out: None,
            text: String::new(),
            calls: Vec::new(),
            open: None,
            buf: Vec::new(),
            out: Vec::new(),
            started: false,
            done: false,
            status: None,
            response: None,
        })
    }

    /// Whether the stream ended (`[DONE]` or an error): nothing more is sent.
    #[must_use]
    pub fn done(&self) -> bool {
        self.done
    }

    /// The final response's status (`completed`, `incomplete`, `failed`) once done.
    #[must_use]
    pub fn status(&self) -> Option<&'static str> {
        self.status
    }

    /// The final response object's JSON once done (what the store keeps).
    #[must_use]
    pub fn response(&self) -> Option<&[u8]> {
        self.response.as_deref()
    }

    /// Translates one send (the first also starts the response); the returned bytes are valid
    /// until the next call.
    pub fn feed(&mut self, data: &[u8]) -> &[u8] {
        self.out.clear();
        if !self.started {
            self.start();
        }
        let mut buf = std::mem::take(&mut self.buf);
        each_frame(&mut buf, data, |frame| {
            if !self.done {
                self.frame(frame);
            }
        });
        self.buf = buf;
        &self.out
    }

    /// `event: <kind>\ndata: {"type":"<kind>","sequence_number":N` (the caller closes it).
    fn ev(&mut self, kind: &str) {
        let o = &mut self.out;
        o.extend_from_slice(b"event: ");
        o.extend_from_slice(kind.as_bytes());
        o.extend_from_slice(b"\ndata: {\"type\":\"");
        o.extend_from_slice(kind.as_bytes());
        o.extend_from_slice(b"\",\"sequence_number\":");
        put_num(o, self.seq);
        self.seq += 1;
    }

    fn end_ev(&mut self) {
        self.out.extend_from_slice(b"}\n\n");
    }

    /// The response object onto `out`.
    fn put_response(
        &self,
        out: &mut Vec<u8>,
        status: &str,
        error: Option<(&str, &str)>,
        incomplete: Option<&str>,
        usage: bool,
    ) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(status.as_bytes());
        out.extend_from_slice(b"\",\"error\":");
        match error {
            Some((code, message)) => {
                out.extend_from_slice(b"{\"code\":");
                put_str(out, code);
                out.extend_from_slice(b",\"message\":");
                put_str(out, message);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"incomplete_details\":");
        match incomplete {
            Some(r) => {
                out.extend_from_slice(b"{\"reason\":");
                put_str(out, r);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(&self.model);
        let mut first = true;
        for item in self.output.iter().flatten() {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(item);
        }
        out.extend_from_slice(&self.prev);
        if usage {
            let (p, c) = (self.prompt, self.completion);
            out.extend_from_slice(b"{\"input_tokens\":");
            put_num(out, p);
            out.extend_from_slice(
                b",\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":",
            );
            put_num(out, c);
            out.extend_from_slice(
                b",\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":",
            );
            let total = i128::from(p) + i128::from(c);
            put_num(out, total);
            out.push(b'}');
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(&self.echo);
    }

    fn start(&mut self) {
        self.started = true;
        let mut r = Vec::new();
        self.put_response(&mut r, "in_progress", None, None, false);
        for kind in ["response.created", "response.in_progress"] {
            self.ev(kind);
            self.out.extend_from_slice(b",\"response\":");
            self.out.extend_from_slice(&r);
            self.end_ev();
        }
    }

    /// Pings and the timing comment pass through.
    fn frame(&mut self, frame: &[u8]) {
        match read_frame::<Chunk<'_>>(frame, &mut self.out) {
            Some(Frame::Done) => self.end(),
            Some(Frame::Chunk(chunk)) => self.chunk(chunk),
            None => {}
        }
    }

    fn chunk(&mut self, c: Chunk<'_>) {
        if let Some(err) = c.error {
            let code = err.code.and_then(raw_str);
            self.fail(err.message.as_deref().unwrap_or(""), code.as_deref());
            return;
        }
        if let Some(u) = c.usage {
            self.prompt = u.prompt_tokens;
            self.completion = u.completion_tokens;
        }
        for choice in c.choices.unwrap_or_default() {
            if choice.index != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                    let i = match self.msg_out {
                        Some(i) => i,
                        None => self.open_message(),
                    };
                    self.text.push_str(text);
                    self.ev("response.output_text.delta");
                    self.out.extend_from_slice(b",\"item_id\":");
                    self.out.extend_from_slice(&self.msg_id);
                    self.out.extend_from_slice(b",\"output_index\":");
                    put_num(&mut self.out, i);
                    self.out
                        .extend_from_slice(b",\"content_index\":0,\"delta\":");
                    put_str(&mut self.out, text);
                    self.out.extend_from_slice(b",\"logprobs\":[]");
                    self.end_ev();
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.call(&call);
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(reason.into_owned());
            }
        }
    }

    fn open_message(&mut self) -> usize {
        self.close_call();
        let i = self.output.len();
        self.msg_out = Some(i);
        self.output.push(None);
        self.ev("response.output_item.added");
        self.out.extend_from_slice(b",\"output_index\":");
        put_num(&mut self.out, i);
        self.out
            .extend_from_slice(b",\"item\":{\"type\":\"message\",\"id\":");
        self.out.extend_from_slice(&self.msg_id);
        self.out.extend_from_slice(
            b",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]}",
        );
        self.end_ev();
        self.ev("response.content_part.added");
        self.ids(i);
        self.out.extend_from_slice(
            b",\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[],\"logprobs\":[]}",
        );
        self.end_ev();
        i
    }

    /// `,"item_id":"msg_..","output_index":i,"content_index":0`
    fn ids(&mut self, i: usize) {
        self.out.extend_from_slice(b",\"item_id\":");
        self.out.extend_from_slice(&self.msg_id);
        self.out.extend_from_slice(b",\"output_index\":");
        put_num(&mut self.out, i);
        self.out.extend_from_slice(b",\"content_index\":0");
    }

    fn close_message(&mut self) {
        let Some(i) = self.msg_out.take() else {
            return;
        };
        let mut part = b"{\"type\":\"output_text\",\"text\":".to_vec();
        put_str(&mut part, &self.text);
        part.extend_from_slice(b",\"annotations\":[],\"logprobs\":[]}");
        let mut item = b"{\"type\":\"message\",\"id\":".to_vec();
        item.extend_from_slice(&self.msg_id);
        item.extend_from_slice(b",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[");
        item.extend_from_slice(&part);
        item.extend_from_slice(b"]}");
        self.ev("response.output_text.done");
        self.ids(i);
        self.out.extend_from_slice(b",\"text\":");
        put_str(&mut self.out, &self.text);
        self.out.extend_from_slice(b",\"logprobs\":[]");
        self.end_ev();
        self.ev("response.content_part.done");
        self.ids(i);
        self.out.extend_from_slice(b",\"part\":");
        self.out.extend_from_slice(&part);
        self.end_ev();
        self.item_done(i, &item);
        if let Some(slot) = self.output.get_mut(i) {
            *slot = Some(item);
        }
    }

    fn item_done(&mut self, i: usize, item: &[u8]) {
        self.ev("response.output_item.done");
        self.out.extend_from_slice(b",\"output_index\":");
        put_num(&mut self.out, i);
        self.out.extend_from_slice(b",\"item\":");
        self.out.extend_from_slice(item);
        self.end_ev();
    }

    /// A function_call item (`arguments`, `status`) onto `out`.
    fn put_call_item(out: &mut Vec<u8>, call: &Call, args: &str, status: &str) {
        out.extend_from_slice(b"{\"type\":\"function_call\",\"id\":");
        out.extend_from_slice(&call.fc_id);
        out.extend_from_slice(b",\"call_id\":");
        put_str(out, &call.id);
        out.extend_from_slice(b",\"name\":");
        put_str(out, &call.name);
        out.extend_from_slice(b",\"arguments\":");
        put_str(out, args);
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(status.as_bytes());
        out.extend_from_slice(b"\"}");
    }

    fn call(&mut self, dc: &DeltaCall<'_>) {
        let pos = if let Some(pos) = self.calls.iter().position(|c| c.index == dc.index) {
            pos
        } else {
            self.close_message();
            self.close_call();
            let i = self.output.len();
            self.output.push(None);
            let name = dc.name().to_owned();
            let id = dc
                .id
                .as_deref()
                .filter(|id| !id.is_empty())
                .map_or_else(|| format!("call_{}_{}", self.tail, dc.index), str::to_owned);
            let mut fc_id = Vec::new();
            put_str(&mut fc_id, &format!("fc_{}_{}", self.tail, dc.index));
            let call = Call {
                index: dc.index,
                fc_id,
                id,
                name,
                out: i,
                args: String::new(),
            };
            self.ev("response.output_item.added");
            self.out.extend_from_slice(b",\"output_index\":");
            put_num(&mut self.out, i);
            self.out.extend_from_slice(b",\"item\":");
            Self::put_call_item(&mut self.out, &call, "", "in_progress");
            self.end_ev();
            self.calls.push(call);
            let pos = self.calls.len() - 1;
            self.open = Some(pos);
            pos
        };
        let Some(args) = dc.arguments() else {
            return;
        };
        let Some(call) = self.calls.get_mut(pos) else {
            return;
        };
        call.args.push_str(args);
        let out = call.out;
        self.ev("response.function_call_arguments.delta");
        self.out.extend_from_slice(b",\"item_id\":");
        if let Some(call) = self.calls.get(pos) {
            self.out.extend_from_slice(&call.fc_id);
        }
        self.out.extend_from_slice(b",\"output_index\":");
        put_num(&mut self.out, out);
        self.out.extend_from_slice(b",\"delta\":");
        put_str(&mut self.out, args);
        self.end_ev();
    }

    fn close_call(&mut self) {
        let Some(pos) = self.open.take() else {
            return;
        };
        let Some(call) = self.calls.get(pos) else {
            return;
        };
        let mut item = Vec::new();
        Self::put_call_item(&mut item, call, &call.args, "completed");
        let mut done = b",\"item_id\":".to_vec();
        done.extend_from_slice(&call.fc_id);
        done.extend_from_slice(b",\"output_index\":");
        put_num(&mut done, call.out);
        done.extend_from_slice(b",\"arguments\":");
        put_str(&mut done, &call.args);
        done.extend_from_slice(b",\"name\":");
        put_str(&mut done, &call.name);
        let i = call.out;
        self.ev("response.function_call_arguments.done");
        self.out.extend_from_slice(&done);
        self.end_ev();
        self.item_done(i, &item);
        if let Some(slot) = self.output.get_mut(i) {
            *slot = Some(item);
        }
    }

    fn end(&mut self) {
        self.close_message();
        self.close_call();
        self.done = true;
        let reason = incomplete_reason(self.finish.as_deref());
        let status = if reason.is_some() {
            "incomplete"
        } else {
            "completed"
        };
        let mut r = Vec::new();
        self.put_response(&mut r, status, None, reason, true);
        self.ev(if reason.is_some() {
            "response.incomplete"
        } else {
            "response.completed"
        });
        self.out.extend_from_slice(b",\"response\":");
        self.out.extend_from_slice(&r);
        self.end_ev();
        self.status = Some(status);
        self.response = Some(r);
    }

    fn fail(&mut self, message: &str, code: Option<&str>) {
        self.done = true;
        let stored_code = code.filter(|c| !c.is_empty()).unwrap_or("server_error");
        let mut r = Vec::new();
        self.put_response(&mut r, "failed", Some((stored_code, message)), None, false);
        self.ev("error");
        self.out.extend_from_slice(b",\"code\":");
        match code {
            Some(c) => put_str(&mut self.out, c),
            None => self.out.extend_from_slice(b"null"),
        }
        self.out.extend_from_slice(b",\"message\":");
        put_str(&mut self.out, message);
        self.out.extend_from_slice(b",\"param\":null");
        self.end_ev();
        self.ev("response.failed");
        self.out.extend_from_slice(b",\"response\":");
        self.out.extend_from_slice(&r);
        self.end_ev();
        self.status = Some("failed");
        self.response = Some(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chatframes::testing::{chunk, events, tool_call_sends};
    use serde_json::Value;

    const ECHO: &[u8] = br#"{"instructions":null,"metadata":{},"tools":[{"type":"function","name":"f"}],"store":true}"#;

    fn stream() -> ResponsesStream {
        ResponsesStream::new("resp_abc", "m\"x", 7, None, ECHO, 0)
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn check_types_and_sequence(ev: &[(String, Value)]) {
        for (i, (name, data)) in ev.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i);
        }
    }

    #[test]
    fn text_stream_and_length_stop() {
        let mut s = stream();
        let mut out = s
            .feed(&chunk(r#"{"role":"assistant","content":""}"#))
            .to_vec();
        out.extend_from_slice(s.feed(&chunk(r#"{"content":"Hel"}"#)));
        out.extend_from_slice(s.feed(&chunk(r#"{"content":"lo \"q\"\n\u0001"}"#)));
        assert!(!s.done());
        out.extend_from_slice(s.feed(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n: x-cost\n\ndata: [DONE]\n\n",
        ));
        assert!(String::from_utf8_lossy(&out).contains(": x-cost\n\n"));
        let ev = events(&out);
        check_types_and_sequence(&ev);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete",
            ]
        );
        let created = &ev[0].1["response"];
        assert_eq!(created["model"], "m\"x");
        assert_eq!(created["status"], "in_progress");
        assert_eq!(created["tools"][0]["name"], "f");
        assert_eq!(created["usage"], Value::Null);
        assert_eq!(ev[4].1["item_id"], "msg_abc");
        assert_eq!(ev[6].1["text"], "Hello \"q\"\n\u{1}");
        let r = &ev[9].1["response"];
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(r["usage"]["total_tokens"], 5);
        assert_eq!(r["output"][0]["content"][0]["text"], "Hello \"q\"\n\u{1}");
        assert!(s.done());
        assert_eq!(s.status(), Some("incomplete"));
        let stored: Value =
            serde_json::from_slice(s.response().unwrap_or_default()).unwrap_or(Value::Null);
        assert_eq!(&stored, r);
        // nothing after the end
        assert!(s.feed(b": ping\n\n").is_empty());
    }

    #[test]
    fn tool_calls_split_mid_frame() {
        let mut s = stream();
        let mut out = Vec::new();
        for send in tool_call_sends() {
            out.extend_from_slice(s.feed(&send));
        }
        let ev = events(&out);
        check_types_and_sequence(&ev);
        let last = &ev[ev.len() - 1];
        assert_eq!(last.0, "response.completed");
        let output = &last.1["response"]["output"];
        assert_eq!(output[0]["type"], "message");
        assert_eq!(output[1]["call_id"], "call_a");
        assert_eq!(output[1]["id"], "fc_abc_0");
        assert_eq!(output[1]["arguments"], r#"{"a":1}"#);
        assert_eq!(output[2]["call_id"], "call_abc_1");
        assert_eq!(output[2]["name"], "g");
        let done: Vec<&Value> = ev
            .iter()
            .filter(|(n, _)| n == "response.function_call_arguments.done")
            .map(|(_, d)| &d["arguments"])
            .collect();
        assert_eq!(done, [r#"{"a":1}"#, "{}"]);
        assert_eq!(s.status(), Some("completed"));
    }

    #[test]
    fn errors_fail_the_response() {
        let mut s = stream();
        let out = s
            .feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n: ping\n\ndata: not json\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":null}}\n\ndata: {\"error\":{\"message\":\"gone\",\"type\":\"upstream_error\",\"code\":\"upstream_unavailable\"}}\n\ndata: [DONE]\n\n")
            .to_vec();
        let ev = events(&out);
        check_types_and_sequence(&ev);
        let n = ev.len();
        assert_eq!(ev[n - 2].0, "error");
        assert_eq!(ev[n - 2].1["code"], "upstream_unavailable");
        assert_eq!(ev[n - 1].0, "response.failed");
        let r = &ev[n - 1].1["response"];
        assert_eq!(r["error"]["message"], "gone");
        assert_eq!(r["output"], Value::Array(vec![])); // the open message is dropped
        assert_eq!(s.status(), Some("failed"));
        let mut s = stream();
        let out = s
            .feed(b"data: {\"error\":{\"message\":\"m\",\"code\":5}}\n\n")
            .to_vec();
        let ev = events(&out);
        assert_eq!(ev[2].1["code"], Value::Null);
        assert_eq!(ev[3].1["response"]["error"]["code"], "server_error");
        assert!(ResponsesStream::new("resp_1", "m", 0, None, b"[1]", 0).is_err());
        assert!(ResponsesStream::new("resp_1", "m", 0, None, b"{\"a\":", 0).is_err());
        assert!(ResponsesStream::new("resp_1", "m", 0, Some("resp_0"), b" {} ", 0).is_ok());
        assert_eq!(incomplete_reason(Some("stop")), None);
    }
}
