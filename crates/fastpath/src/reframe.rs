//! The OpenAI stream re-framer: one call per upstream read turns upstream SSE bytes into the
//! client's bytes and records what the gateway needs afterwards (usage, errors, the completion
//! text for counting, finish reason, id/model/created for synthesized chunks).
//!
//! Pass-through payloads are re-emitted byte for byte, never re-serialized. Each payload is
//! read once by serde seeds that visit only the fields used and append text straight into the
//! completion buffer, so a typical chunk costs one JSON scan and no allocation.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::emit::{self, Usage};
use crate::sse::{Event, Parser, SseError};
use crate::tokens::Str;

#[derive(Debug)]
pub struct Reframer {
    parser: Parser,
    state: State,
}

#[derive(Debug, Default)]
struct State {
    strip_usage: bool,
    /// Bytes to send for the current call; reused across calls.
    out: Vec<u8>,
    done: bool,
    usage: Option<Usage>,
    /// `usage.prompt_tokens_details.cached_tokens` as the upstream reported it.
    cached_tokens: Option<u64>,
    error: Option<String>,
    events: u64,
    invalid_events: u64,
    completion: String,
    finish_reason: Option<String>,
    chunk_id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
    text_completion: Option<bool>,
}

impl Reframer {
    #[must_use]
    pub fn new(strip_usage: bool, max_event_bytes: usize) -> Self {
        Self {
            parser: Parser::new(max_event_bytes),
            state: State {
                strip_usage,
                ..State::default()
            },
        }
    }

    /// Re-frames one upstream read; the returned bytes are valid until the next call.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<&[u8], SseError> {
        let state = &mut self.state;
        state.out.clear();
        self.parser
            .feed(chunk, &mut |e: &Event<'_>| state.on_data(e.data))?;
        Ok(&self.state.out)
    }

    /// End of upstream bytes: an event that lacks only its closing blank line is still
    /// delivered (its data lines all ended); an unterminated last line is dropped.
    pub fn finish(&mut self) -> &[u8] {
        let state = &mut self.state;
        state.out.clear();
        self.parser
            .flush(&mut |e: &Event<'_>| state.on_data(e.data));
        &self.state.out
    }

    #[must_use]
    pub fn done(&self) -> bool {
        self.state.done
    }
    #[must_use]
    pub fn usage(&self) -> Option<Usage> {
        self.state.usage
    }
    /// The prompt tokens the upstream served from its prompt cache, when it said.
    #[must_use]
    pub fn cached_tokens(&self) -> Option<u64> {
        self.state.cached_tokens
    }
    #[must_use]
    pub fn error(&self) -> Option<&str> {
        self.state.error.as_deref()
    }
    #[must_use]
    pub fn events(&self) -> u64 {
        self.state.events
    }
    #[must_use]
    pub fn invalid_events(&self) -> u64 {
        self.state.invalid_events
    }
    #[must_use]
    pub fn completion_text(&self) -> &str {
        &self.state.completion
    }
    #[must_use]
    pub fn finish_reason(&self) -> Option<&str> {
        self.state.finish_reason.as_deref()
    }
    #[must_use]
    pub fn chunk_id(&self) -> Option<&str> {
        self.state.chunk_id.as_deref()
    }
    #[must_use]
    pub fn model(&self) -> Option<&str> {
        self.state.model.as_deref()
    }
    #[must_use]
    pub fn created(&self) -> Option<i64> {
        self.state.created
    }
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.parser.buffered()
    }

    /// A final `"choices":[]` frame with this usage, in the upstream's id/model/created/object.
    pub fn usage_chunk(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> serde_json::Result<Vec<u8>> {
        let s = &self.state;
        let object = if s.text_completion == Some(true) {
            "text_completion"
        } else {
            "chat.completion.chunk"
        };
        let created = s.created.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        });
        emit::usage_frame(
            s.chunk_id.as_deref().unwrap_or(""),
            object,
            created,
            s.model.as_deref().unwrap_or(""),
            Usage::new(prompt_tokens, completion_tokens),
        )
    }
}

impl State {
    fn on_data(&mut self, data: &[u8]) {
        self.events += 1;
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return;
        }
        let text_len = self.completion.len();
        let mut de = serde_json::Deserializer::from_slice(data);
        let parsed = FrameSeed(&mut self.completion)
            .deserialize(&mut de)
            .and_then(|frame| de.end().map(|()| frame));
        let emit = if let Ok(frame) = parsed {
            self.record(frame)
        } else {
            // Not JSON, or not the shape of a chunk: pass it on untouched, count nothing.
            self.completion.truncate(text_len);
            self.invalid_events += 1;
            true
        };
        if emit {
            emit::data_frame(&mut self.out, data);
        }
    }

    /// Records a parsed chunk; returns whether to emit it.
    fn record(&mut self, f: Frame<'_>) -> bool {
        if self.chunk_id.is_none() {
            self.chunk_id = f.id.map(|s| s.0.into_owned());
        }
        if self.model.is_none() {
            self.model = f.model.map(|s| s.0.into_owned());
        }
        if self.created.is_none() {
            self.created = f.created;
        }
        if self.text_completion.is_none() {
            self.text_completion = f.object.map(|o| o.0 == "text_completion");
        }
        if let Some(reason) = f.finish_reason {
            self.finish_reason = Some(reason.0.into_owned());
        }
        if self.error.is_none() {
            self.error = f
                .error
                .filter(|e| e.get().starts_with('{'))
                .map(|e| e.get().to_owned());
        }
        let Some(usage) = f.usage else {
            return true;
        };
        let (p, c) = (
            usage.prompt_tokens.unwrap_or(0),
            usage.completion_tokens.unwrap_or(0),
        );
        self.cached_tokens = usage.prompt_tokens_details.and_then(|d| d.cached_tokens);
        self.usage = Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: usage.total_tokens.unwrap_or(p.saturating_add(c)),
        });
        f.choices > 0 || !self.strip_usage
    }
}

// ---- the payload view: serde seeds over the few fields used ----------------------------------

#[derive(Default)]
struct Frame<'a> {
    id: Option<Str<'a>>,
    model: Option<Str<'a>>,
    created: Option<i64>,
    object: Option<Str<'a>>,
    /// Number of entries in `choices` (absent or null: 0).
    choices: usize,
    /// `finish_reason` of choice 0.
    finish_reason: Option<Str<'a>>,
    usage: Option<UsageView>,
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageView {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<DetailsView>,
}

#[derive(Deserialize)]
struct DetailsView {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum FrameKey {
    Id,
    Model,
    Created,
    Object,
    Choices,
    Usage,
    Error,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ChoiceKey {
    Index,
    Delta,
    Text,
    FinishReason,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DeltaKey {
    Content,
    ToolCalls,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ToolCallKey {
    Function,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum FunctionKey {
    Arguments,
    #[serde(other)]
    Other,
}

/// `null` is accepted wherever an object, list or string is read; it contributes nothing.
macro_rules! nullable {
    ($read:ident) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.$read(self)
        }
    };
}

macro_rules! seed {
    ($ty:ident) => {
        impl<'de> DeserializeSeed<'de> for $ty<'_> {
            type Value = <Self as Visitor<'de>>::Value;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_option(self)
            }
        }
    };
}

/// The whole payload: a JSON object.
struct FrameSeed<'s>(&'s mut String);

impl<'de> Visitor<'de> for FrameSeed<'_> {
    type Value = Frame<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Frame<'de>, A::Error> {
        let mut frame = Frame::default();
        while let Some(key) = map.next_key()? {
            match key {
                FrameKey::Id => frame.id = map.next_value()?,
                FrameKey::Model => frame.model = map.next_value()?,
                FrameKey::Created => frame.created = map.next_value()?,
                FrameKey::Object => frame.object = map.next_value()?,
                FrameKey::Choices => {
                    let (n, reason) = map.next_value_seed(ChoicesSeed(&mut *self.0))?;
                    frame.choices += n;
                    frame.finish_reason = reason.or(frame.finish_reason);
                }
                FrameKey::Usage => frame.usage = map.next_value()?,
                FrameKey::Error => frame.error = map.next_value()?,
                FrameKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(frame)
    }
}

impl<'de> DeserializeSeed<'de> for FrameSeed<'_> {
    type Value = Frame<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// `choices`: the count, and choice 0's finish_reason.
struct ChoicesSeed<'s>(&'s mut String);
seed!(ChoicesSeed);

impl<'de> Visitor<'de> for ChoicesSeed<'_> {
    type Value = (usize, Option<Str<'de>>);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of choices")
    }
    nullable!(deserialize_seq);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut n, mut reason) = (0, None);
        while let Some((index, finish)) = seq.next_element_seed(ChoiceSeed(&mut *self.0))? {
            n += 1;
            // Single-choice upstreams sometimes leave out `index`.
            if index.unwrap_or(0) == 0 && finish.is_some() {
                reason = finish;
            }
        }
        Ok((n, reason))
    }
}

/// One choice: its index and finish_reason; `delta` and `text` feed the completion text.
struct ChoiceSeed<'s>(&'s mut String);
seed!(ChoiceSeed);

impl<'de> Visitor<'de> for ChoiceSeed<'_> {
    type Value = (Option<u64>, Option<Str<'de>>);
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a choice object")
    }
    nullable!(deserialize_map);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut index, mut finish) = (None, None);
        while let Some(key) = map.next_key()? {
            match key {
                ChoiceKey::Index => index = map.next_value()?,
                ChoiceKey::Delta => map.next_value_seed(DeltaSeed(&mut *self.0))?,
                ChoiceKey::Text => map.next_value_seed(AppendSeed(&mut *self.0))?,
                ChoiceKey::FinishReason => finish = map.next_value()?,
                ChoiceKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((index, finish))
    }
}

/// `delta`: `content` and every `tool_calls[].function.arguments`.
struct DeltaSeed<'s>(&'s mut String);
seed!(DeltaSeed);

impl<'de> Visitor<'de> for DeltaSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a delta object")
    }
    nullable!(deserialize_map);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key()? {
            match key {
                DeltaKey::Content => map.next_value_seed(AppendSeed(&mut *self.0))?,
                DeltaKey::ToolCalls => map.next_value_seed(ToolCallsSeed(&mut *self.0))?,
                DeltaKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct ToolCallsSeed<'s>(&'s mut String);
seed!(ToolCallsSeed);

impl<'de> Visitor<'de> for ToolCallsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of tool calls")
    }
    nullable!(deserialize_seq);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ToolCallSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// One tool call delta: only its `function` is read.
struct ToolCallSeed<'s>(&'s mut String);
seed!(ToolCallSeed);

impl<'de> Visitor<'de> for ToolCallSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tool call object")
    }
    nullable!(deserialize_map);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key()? {
            match key {
                ToolCallKey::Function => map.next_value_seed(FunctionSeed(&mut *self.0))?,
                ToolCallKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct FunctionSeed<'s>(&'s mut String);
seed!(FunctionSeed);

impl<'de> Visitor<'de> for FunctionSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a function object")
    }
    nullable!(deserialize_map);
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key()? {
            match key {
                FunctionKey::Arguments => map.next_value_seed(AppendSeed(&mut *self.0))?,
                FunctionKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A string (or null) appended to the completion text, unescaped, without a temporary.
struct AppendSeed<'s>(&'s mut String);
seed!(AppendSeed);

impl<'de> Visitor<'de> for AppendSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }
    nullable!(deserialize_str);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    const UPSTREAM: &[u8] = b": keep-alive\n\n\
data: {\"id\":\"c-1\",\"object\":\"chat.completion.chunk\",\"created\":17,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi \\\"you\\\"\\n\\u00e9\xF0\x9F\x98\x80\"},\"finish_reason\":null}]}\r\n\r\n\
event: ignored\nid: 5\ndata: {\"id\":\"c-1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\"\"}}]},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n\
data: [DONE]\n\n";

    fn run(strip_usage: bool, chunks: &[&[u8]]) -> (Reframer, Vec<u8>) {
        let mut r = Reframer::new(strip_usage, 1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(r.feed(c).unwrap());
        }
        out.extend_from_slice(r.finish());
        (r, out)
    }

    fn data_lines(bytes: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(bytes).unwrap();
        text.split("\n\n")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn stream_is_reframed_and_recorded() {
        let (r, out) = run(true, &[UPSTREAM]);
        let frames = data_lines(&out);
        assert_eq!(frames.len(), 4, "{frames:#?}");
        assert!(frames
            .iter()
            .all(|f| f.starts_with("data: {\"id\":\"c-1\"")));
        assert!(!String::from_utf8_lossy(&out).contains("DONE"));
        assert!(r.done());
        assert_eq!(
            r.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                total_tokens: 8
            })
        );
        assert_eq!(r.cached_tokens(), Some(0));
        assert_eq!(r.completion_text(), "Hi \"you\"\n\u{e9}\u{1F600}{\"a\"");
        assert_eq!(r.finish_reason(), Some("stop"));
        assert_eq!(
            (r.chunk_id(), r.model(), r.created()),
            (Some("c-1"), Some("gpt-4o"), Some(17))
        );
        assert_eq!((r.events(), r.invalid_events(), r.error()), (6, 0, None));

        let (r, kept) = run(false, &[UPSTREAM]);
        assert_eq!(data_lines(&kept).len(), 5);
        assert!(r.usage().is_some());
    }

    #[test]
    fn every_split_gives_the_same_bytes() {
        let (_, whole) = run(true, &[UPSTREAM]);
        for i in 0..=UPSTREAM.len() {
            let (r, out) = run(true, &[&UPSTREAM[..i], &UPSTREAM[i..]]);
            assert_eq!(out, whole, "split at {i}");
            assert_eq!(r.completion_text(), "Hi \"you\"\n\u{e9}\u{1F600}{\"a\"");
        }
    }

    #[test]
    fn invalid_and_error_payloads() {
        let (r, out) = run(
            true,
            &[b"data: not json\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}], oops\n\ndata: {\"choices\":7}\n\ndata: {\"error\":{\"message\":\"boom\",\"code\":null}}\n\n"],
        );
        assert_eq!(r.invalid_events(), 3);
        assert_eq!(
            r.completion_text(),
            "",
            "text of an invalid payload is not kept"
        );
        assert_eq!(r.error(), Some("{\"message\":\"boom\",\"code\":null}"));
        assert_eq!(data_lines(&out).len(), 4);
        assert!(!r.done());
    }

    #[test]
    fn cached_prompt_tokens_are_kept_and_absent_details_are_none() {
        let (r, _) = run(
            true,
            &[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"prompt_tokens_details\":{\"cached_tokens\":7}}}\n\n"],
        );
        assert_eq!(r.cached_tokens(), Some(7));
        let (r, _) = run(
            true,
            &[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"prompt_tokens_details\":null}}\n\n"],
        );
        assert_eq!(r.cached_tokens(), None);
    }

    #[test]
    fn usage_with_choices_is_emitted_and_text_completion_object() {
        let (r, out) = run(
            true,
            &[b"data: {\"object\":\"text_completion\",\"choices\":[{\"text\":\"ab\",\"index\":0,\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n"],
        );
        assert_eq!(data_lines(&out).len(), 1);
        assert_eq!(
            r.usage(),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3
            })
        );
        assert_eq!(
            (r.completion_text(), r.finish_reason()),
            ("ab", Some("length"))
        );
        let frame = r.usage_chunk(4, 5).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&frame[6..frame.len() - 2]).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["total_tokens"], 9);
        assert_eq!(v["choices"], serde_json::json!([]));
    }

    #[test]
    fn finish_delivers_a_terminated_but_unclosed_event() {
        let (r, out) = run(true, &[b"data: [DONE]\n"]);
        assert!(r.done() && out.is_empty());
        let (r, out) = run(true, &[b"data: {}\n", b"data: {\"x\""]);
        assert_eq!((r.events(), out.as_slice()), (1, &b"data: {}\n\n"[..]));
    }
}
