//! BPE token counting with OpenAI's own vocabularies (bundled, offline; see `bpe`), the
//! model → encoding map, the cookbook rules for chat requests, and a cheap estimate.
//!
//! Each encoder takes tens of ms and several MB to build, so it is built on first use, once per
//! process (`OnceLock`), never at import: granian forks its workers after importing the app, and
//! nothing here starts a thread, so a fork sees either a finished table or none.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::bpe::Bpe;

/// The BPE vocabularies the gateway knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

#[derive(Debug)]
pub enum TokenError {
    UnknownEncoding(String),
    /// The bundled vocabulary failed to load (a broken build, not bad input).
    Init(String),
    InvalidRequest(String),
    /// A token id outside the vocabulary, or (decoding to text) bytes that are not UTF-8.
    Decode(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownEncoding(name) => write!(
                f,
                "unknown encoding {name:?} (known: o200k_base, cl100k_base)"
            ),
            Self::Init(msg) => write!(f, "could not build the BPE tables: {msg}"),
            Self::InvalidRequest(msg) => write!(f, "cannot count tokens of the request: {msg}"),
            Self::Decode(msg) => write!(f, "cannot decode the tokens: {msg}"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Model-name prefixes, checked in order: the first match wins, so the o200k families that
/// share a prefix with older cl100k ones (`gpt-4o` vs `gpt-4`) come first.
const MODEL_PREFIXES: &[(&str, Encoding)] = &[
    ("gpt-4o", Encoding::O200kBase),
    ("gpt-4.1", Encoding::O200kBase),
    ("gpt-5", Encoding::O200kBase),
    ("o1", Encoding::O200kBase),
    ("o3", Encoding::O200kBase),
    ("o4", Encoding::O200kBase),
    ("chatgpt-4o", Encoding::O200kBase),
    ("gpt-4", Encoding::Cl100kBase),
    ("gpt-3.5", Encoding::Cl100kBase),
    ("text-embedding-3", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
];

impl Encoding {
    pub fn from_name(name: &str) -> Result<Self, TokenError> {
        match name {
            "o200k_base" => Ok(Self::O200kBase),
            "cl100k_base" => Ok(Self::Cl100kBase),
            _ => Err(TokenError::UnknownEncoding(name.to_owned())),
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
        }
    }

    /// Unknown models get `o200k_base`, the encoding of every current OpenAI chat model.
    #[must_use]
    pub fn for_model(model: &str) -> Self {
        MODEL_PREFIXES
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix))
            .map_or(Self::O200kBase, |&(_, enc)| enc)
    }

    fn bpe(self) -> Result<&'static Bpe, TokenError> {
        static O200K: OnceLock<Result<Bpe, String>> = OnceLock::new();
        static CL100K: OnceLock<Result<Bpe, String>> = OnceLock::new();
        let cell = match self {
            Self::O200kBase => O200K.get_or_init(|| Bpe::o200k_base().map_err(|e| e.to_string())),
            Self::Cl100kBase => {
                CL100K.get_or_init(|| Bpe::cl100k_base().map_err(|e| e.to_string()))
            }
        };
        cell.as_ref().map_err(|msg| TokenError::Init(msg.clone()))
    }

    /// Exact count of ordinary tokens (special-token text such as `<|endoftext|>` is plain text).
    pub fn count(self, text: &str) -> Result<usize, TokenError> {
        self.bpe()?.count_ordinary(text)
    }

    pub fn encode(self, text: &str) -> Result<Vec<u32>, TokenError> {
        self.bpe()?.encode_ordinary(text)
    }

    /// The tokens' bytes (see [`Bpe::decode_bytes`]).
    pub fn decode_bytes(self, tokens: &[u32]) -> Result<Vec<u8>, TokenError> {
        self.bpe()?.decode_bytes(tokens)
    }

    /// The tokens' text; an error if they end (or start) inside a UTF-8 character, as tiktoken's
    /// `decode`.
    pub fn decode(self, tokens: &[u32]) -> Result<String, TokenError> {
        String::from_utf8(self.decode_bytes(tokens)?)
            .map_err(|e| TokenError::Decode(format!("not UTF-8: {e}")))
    }
}

/// Cheap, BPE-free estimate: a quarter token per ASCII byte (rounded up) plus one token per
/// non-ASCII code point. Upper-leaning for English, code and CJK; never 0 for non-empty text.
#[must_use]
pub fn estimate(text: &str) -> usize {
    let bytes = text.as_bytes();
    let ascii = bytes.iter().filter(|b| b.is_ascii()).count();
    // Every non-ASCII code point has exactly one lead byte (0b11xx_xxxx).
    let non_ascii_chars = bytes.iter().filter(|&&b| b >= 0xC0).count();
    ascii.div_ceil(4) + non_ascii_chars
}

// ---- chat / completions request bodies --------------------------------------------------------

/// Per the OpenAI cookbook (`num_tokens_from_messages`): every message is framed by 3 tokens, a
/// `name` costs 1 more, and every reply is primed with 3 (`<|start|>assistant<|message|>`).
const TOKENS_PER_MESSAGE: usize = 3;
const TOKENS_PER_NAME: usize = 1;
const REPLY_PRIMING: usize = 3;

/// A JSON string, borrowed from the input unless it has escapes.
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct Str<'a>(#[serde(borrow)] pub(crate) Cow<'a, str>);

#[derive(Deserialize)]
struct RequestView<'a> {
    #[serde(borrow)]
    messages: Option<Vec<MessageView<'a>>>,
    #[serde(borrow)]
    prompt: Option<Prompt<'a>>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(borrow)]
    role: Option<Str<'a>>,
    #[serde(borrow)]
    content: Option<Content<'a>>,
    #[serde(borrow)]
    name: Option<Str<'a>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallView<'a>>>,
    #[serde(borrow)]
    tool_call_id: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct ToolCallView<'a> {
    #[serde(borrow)]
    function: Option<FunctionView<'a>>,
}

#[derive(Deserialize)]
struct FunctionView<'a> {
    #[serde(borrow)]
    name: Option<Str<'a>>,
    #[serde(borrow)]
    arguments: Option<Str<'a>>,
}

/// A content part; only the text of text parts counts (images etc. are not BPE text).
#[derive(Deserialize)]
struct PartView<'a> {
    #[serde(borrow)]
    text: Option<Str<'a>>,
}

/// `content`: a string or a list of parts.
enum Content<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<PartView<'a>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// `/v1/completions` `prompt`: a string, a list of strings, or pre-tokenized (a list of token
/// ids, or a list of such lists), the last two counted by length.
struct Prompt<'a>(Vec<PromptItem<'a>>);

enum PromptItem<'a> {
    Text(Cow<'a, str>),
    Tokens(usize),
}

impl<'de: 'a, 'a> Deserialize<'de> for PromptItem<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(PromptItem::Tokens(1))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut n = 0;
                while seq.next_element::<u64>()?.is_some() {
                    n += 1;
                }
                Ok(PromptItem::Tokens(n))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Prompt<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt string or list")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Prompt(vec![PromptItem::Text(Cow::Borrowed(v))]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Prompt(vec![PromptItem::Text(Cow::Owned(v.to_owned()))]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                // A flat list of ids is one pre-tokenized prompt.
                Ok(Prompt(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// Prompt tokens of a raw `/v1/chat/completions` or `/v1/completions` request body.
pub fn count_request(body: &[u8], enc: Encoding) -> Result<usize, TokenError> {
    let req: RequestView<'_> =
        serde_json::from_slice(body).map_err(|e| TokenError::InvalidRequest(e.to_string()))?;
    let bpe = enc.bpe()?;
    let text = |s: &str| bpe.count_ordinary(s);
    let count = |s: Option<&Str<'_>>| s.map_or(Ok(0), |s| text(&s.0));
    if let Some(messages) = req.messages {
        let mut total = REPLY_PRIMING;
        for m in &messages {
            total += TOKENS_PER_MESSAGE;
            total += count(m.role.as_ref())?;
            match &m.content {
                Some(Content::Text(t)) => total += text(t)?,
                Some(Content::Parts(parts)) => {
                    for p in parts {
                        total += count(p.text.as_ref())?;
                    }
                }
                None => {}
            }
            if let Some(name) = &m.name {
                total += text(&name.0)? + TOKENS_PER_NAME;
            }
            for f in m
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|c| c.function.as_ref())
            {
                total += count(f.name.as_ref())? + count(f.arguments.as_ref())?;
            }
            total += count(m.tool_call_id.as_ref())?;
        }
        return Ok(total);
    }
    match req.prompt {
        Some(Prompt(items)) => {
            let mut total = 0;
            for item in &items {
                total += match item {
                    PromptItem::Text(t) => text(t)?,
                    PromptItem::Tokens(n) => *n,
                };
            }
            Ok(total)
        }
        None => Err(TokenError::InvalidRequest(
            "the body has neither `messages` nor `prompt`".to_owned(),
        )),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn model_map() {
        for m in [
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "o1-preview",
            "o3-mini",
            "o4-mini",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::O200kBase, "{m}");
        }
        for m in ["chatgpt-4o-latest", "unknown-model", ""] {
            assert_eq!(Encoding::for_model(m), Encoding::O200kBase, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
            "text-embedding-ada-002",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::Cl100kBase, "{m}");
        }
    }

    #[test]
    fn encoding_names_round_trip() {
        for e in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(Encoding::from_name(e.name()).unwrap(), e);
        }
        assert!(matches!(
            Encoding::from_name("p50k_base"),
            Err(TokenError::UnknownEncoding(_))
        ));
    }

    #[test]
    fn known_counts() {
        // Reference values from the Python `tiktoken` package.
        assert_eq!(
            Encoding::Cl100kBase.encode("hello world").unwrap(),
            [15339, 1917]
        );
        assert_eq!(
            Encoding::O200kBase.encode("hello world").unwrap(),
            [24912, 2375]
        );
        assert_eq!(Encoding::O200kBase.count("").unwrap(), 0);
        // Special-token text is ordinary text.
        assert!(Encoding::Cl100kBase.count("<|endoftext|>").unwrap() > 1);
    }

    #[test]
    fn decode_inverts_encode_and_wants_whole_characters() {
        assert_eq!(
            Encoding::O200kBase.decode(&[24912, 2375]).unwrap(),
            "hello world"
        );
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let text = "Ça, c'est déjà 日本語 \u{10FFFD} ok";
            let tokens = enc.encode(text).unwrap();
            assert_eq!(enc.decode(&tokens).unwrap(), text);
            // Some prefix ends inside a character (a private-use character is one token per byte).
            let cut = (0..tokens.len())
                .find(|&n| enc.decode(&tokens[..n]).is_err())
                .unwrap();
            assert!(matches!(
                enc.decode(&tokens[..cut]),
                Err(TokenError::Decode(_))
            ));
            let bytes = enc.decode_bytes(&tokens[..cut]).unwrap();
            assert!(text.as_bytes().starts_with(&bytes));
        }
    }

    #[test]
    fn estimate_is_cheap_and_never_zero() {
        assert_eq!(estimate(""), 0);
        assert_eq!(estimate("a"), 1);
        assert_eq!(estimate("abcdefgh"), 2);
        assert_eq!(estimate("日本語"), 3);
        assert_eq!(estimate("e\u{301}"), 1 + 1);
    }

    #[test]
    fn chat_request_follows_cookbook() {
        let enc = Encoding::O200kBase;
        let c = |s: &str| enc.count(s).unwrap();
        let body = br#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are \"terse\".\n"},
            {"role":"user","name":"bob","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}],"unknown":{"x":[1,2]}}"#;
        let want = 3
            + (3 + c("system") + c("You are \"terse\".\n"))
            + (3 + c("user") + c("bob") + 1 + c("hi"))
            + (3 + c("assistant") + c("f") + c("{\"a\":1}"))
            + (3 + c("tool") + c("c1") + c("42"));
        assert_eq!(count_request(body, enc).unwrap(), want);
    }

    #[test]
    fn completions_prompt_forms() {
        let enc = Encoding::Cl100kBase;
        let c = |s: &str| enc.count(s).unwrap();
        assert_eq!(
            count_request(br#"{"prompt":"Say hi"}"#, enc).unwrap(),
            c("Say hi")
        );
        assert_eq!(
            count_request(br#"{"prompt":["a b","c"]}"#, enc).unwrap(),
            c("a b") + c("c")
        );
        assert_eq!(count_request(br#"{"prompt":[1,2,3]}"#, enc).unwrap(), 3);
        assert_eq!(count_request(br#"{"prompt":[[1,2],[3]]}"#, enc).unwrap(), 3);
    }

    #[test]
    fn bad_bodies_are_errors() {
        for body in [&b"{"[..], b"[]", b"{}", b"{\"messages\":\"x\"}", b"\xff"] {
            assert!(matches!(
                count_request(body, Encoding::O200kBase),
                Err(TokenError::InvalidRequest(_))
            ));
        }
    }
}
