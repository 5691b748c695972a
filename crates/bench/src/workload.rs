//! Request bodies: synthetic chat prompts or a JSONL file, pre-rendered as whole HTTP/1.1 requests
//! (head and body in one buffer, one `write` per request).
//!
//! Synthetic input lengths are exact in tokens of the chosen encoding (`--tokenizer`): the user
//! message's `content` has exactly the sampled number of tokens (the server's chat template adds
//! its own framing on top). JSONL requests are counted with the same tokenizer. Output length is
//! steered with `max_tokens` (and `ignore_eos` where the server supports it).

use crate::schedule::Rng;
use crate::tokens::{Encoding, PromptGen};
use serde_json::{Map, Value};

/// Bodies rendered up-front and reused round-robin (synthetic mode), so the hot loop never builds
/// JSON.
pub const SYNTHETIC_POOL: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lengths {
    Fixed(u64),
    Uniform(u64, u64),
    Normal(f64, f64),
}

impl Lengths {
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize| -> Result<f64, String> {
            parts
                .get(i)
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    format!("bad length spec {s:?}: want fixed:N | uniform:LO:HI | normal:MEAN:SD")
                })
        };
        match (parts.first().copied(), parts.len()) {
            (Some("fixed"), 2) => Ok(Lengths::Fixed(num(1)? as u64)),
            (Some("uniform"), 3) => {
                let (lo, hi) = (num(1)? as u64, num(2)? as u64);
                if lo > hi {
                    return Err(format!("bad length spec {s:?}: LO > HI"));
                }
                Ok(Lengths::Uniform(lo, hi))
            }
            (Some("normal"), 3) => Ok(Lengths::Normal(num(1)?, num(2)?)),
            _ => num(0).map(|v| Lengths::Fixed(v as u64)),
        }
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform(lo, hi) => rng.range(lo, hi),
            Lengths::Normal(mean, sd) => (mean + sd * rng.normal()).round().max(1.0) as u64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` to connect to.
    pub authority: String,
    pub path: String,
}

impl Target {
    /// `http://host[:port]/path` (TLS is not supported: benchmark over plain HTTP/1.1).
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("https://") {
            return Err("https:// is not supported; point --url at a plain-HTTP endpoint".into());
        }
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!("--url must start with http:// (got {url:?})"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/v1/chat/completions"),
        };
        if authority.is_empty() {
            return Err(format!("--url has no host: {url:?}"));
        }
        let has_port = if authority.starts_with('[') {
            authority.contains("]:")
        } else {
            authority.contains(':')
        };
        let authority = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            path: path.to_string(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub target: Target,
    pub host_header: String,
    pub model: String,
    pub api_key: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub ignore_eos: bool,
    pub input: Lengths,
    /// Encoding that synthetic prompt lengths (and JSONL inputs) are counted in.
    pub tokenizer: Encoding,
    pub extra: Map<String, Value>,
    pub seed: u64,
}

/// One pre-rendered request.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub bytes: Vec<u8>,
    pub input_tokens: u64,
    pub stream: bool,
}

fn render(spec: &Spec, body: &Value, input_tokens: u64, stream: bool) -> Result<Prepared, String> {
    let json = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        spec.target.path,
        spec.host_header,
        json.len()
    );
    if let Some(key) = &spec.api_key {
        head.push_str("Authorization: Bearer ");
        head.push_str(key);
        head.push_str("\r\n");
    }
    if stream {
        head.push_str("Accept: text/event-stream\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&json);
    Ok(Prepared {
        bytes,
        input_tokens,
        stream,
    })
}

fn apply_common(spec: &Spec, obj: &mut Map<String, Value>) {
    obj.entry("model")
        .or_insert_with(|| Value::from(spec.model.clone()));
    if spec.stream {
        obj.insert("stream".into(), Value::Bool(true));
        obj.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    if let Some(m) = spec.max_tokens {
        obj.insert("max_tokens".into(), Value::from(m));
    }
    if spec.ignore_eos {
        obj.insert("ignore_eos".into(), Value::Bool(true));
    }
    for (k, v) in &spec.extra {
        obj.insert(k.clone(), v.clone());
    }
}

/// Synthetic chat requests: `SYNTHETIC_POOL` distinct prompts drawn with the seeded RNG, each
/// exactly as many tokens long as its sampled length (the same seed gives the same bodies).
pub fn synthetic(spec: &Spec) -> Result<Vec<Prepared>, String> {
    let gen = PromptGen::new(spec.tokenizer)?;
    let mut rng = Rng::new(spec.seed ^ 0x5eed_0fb0_d1e5);
    (0..SYNTHETIC_POOL)
        .map(|_| {
            let tokens = spec.input.sample(&mut rng);
            let content = gen.prompt(&mut rng, tokens as usize)?;
            let mut obj = Map::new();
            obj.insert("model".into(), Value::from(spec.model.clone()));
            obj.insert(
                "messages".into(),
                serde_json::json!([{"role": "user", "content": content}]),
            );
            apply_common(spec, &mut obj);
            render(spec, &Value::Object(obj), tokens, spec.stream)
        })
        .collect()
}

/// Input size of a request body from a file: tokens of the message contents (text parts) or of
/// the prompt (a pre-tokenized prompt counts its ids), without chat framing.
fn count_input_tokens(enc: Encoding, obj: &Map<String, Value>) -> Result<u64, String> {
    fn tokens(enc: Encoding, v: &Value) -> Result<u64, String> {
        Ok(match v {
            Value::String(s) => enc.count(s).map_err(|e| e.to_string())? as u64,
            Value::Number(_) => 1,
            Value::Array(a) => a.iter().map(|x| tokens(enc, x)).sum::<Result<u64, _>>()?,
            Value::Object(o) => match o.get("text").or_else(|| o.get("content")) {
                Some(x) => tokens(enc, x)?,
                None => 0,
            },
            _ => 0,
        })
    }
    match obj.get("messages").or_else(|| obj.get("prompt")) {
        Some(v) => tokens(enc, v),
        None => Ok(0),
    }
}

/// One request body (a JSON object) per non-empty line; `model`, `stream`, `max_tokens` and the
/// extra fields from the command line are applied on top.
pub fn from_jsonl(spec: &Spec, text: &str) -> Result<Vec<Prepared>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("prompts line {}: {e}", i + 1))?;
        let Value::Object(mut obj) = value else {
            return Err(format!("prompts line {}: not a JSON object", i + 1));
        };
        apply_common(spec, &mut obj);
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let input = count_input_tokens(spec.tokenizer, &obj)?;
        out.push(render(spec, &Value::Object(obj), input, stream)?);
    }
    if out.is_empty() {
        return Err("prompts file has no requests".into());
    }
    Ok(out)
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            target: Target::parse("http://127.0.0.1:9/v1/chat/completions").unwrap(),
            host_header: "127.0.0.1:9".into(),
            model: "m".into(),
            api_key: Some("k".into()),
            stream: true,
            max_tokens: Some(16),
            ignore_eos: false,
            input: Lengths::Fixed(8),
            tokenizer: Encoding::O200kBase,
            extra: Map::new(),
            seed: 1,
        }
    }

    #[test]
    fn length_specs() {
        assert_eq!(Lengths::parse("fixed:128"), Ok(Lengths::Fixed(128)));
        assert_eq!(Lengths::parse("64"), Ok(Lengths::Fixed(64)));
        assert_eq!(
            Lengths::parse("uniform:64:256"),
            Ok(Lengths::Uniform(64, 256))
        );
        assert_eq!(
            Lengths::parse("normal:128:32"),
            Ok(Lengths::Normal(128.0, 32.0))
        );
        assert!(Lengths::parse("uniform:9:1").is_err());
        assert!(Lengths::parse("gauss:1").is_err());
        assert!(Lengths::parse("fixed:-3").is_err());
    }

    #[test]
    fn url_parsing() {
        let t = Target::parse("http://localhost:8080/v1/chat/completions").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("localhost:8080", "/v1/chat/completions")
        );
        assert_eq!(Target::parse("http://h").unwrap().authority, "h:80");
        assert!(Target::parse("https://api.openai.com/v1").is_err());
        assert!(Target::parse("ftp://x").is_err());
    }

    #[test]
    fn synthetic_requests_are_complete_http() {
        let reqs = synthetic(&spec()).unwrap();
        assert_eq!(reqs.len(), SYNTHETIC_POOL);
        let text = String::from_utf8(reqs[0].bytes.clone()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Authorization: Bearer k"));
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["stream"], Value::Bool(true));
        assert_eq!(v["max_tokens"], Value::from(16));
        let content = v["messages"][0]["content"].as_str().unwrap();
        assert_eq!(Encoding::O200kBase.count(content).unwrap(), 8);
        assert_eq!(reqs[0].input_tokens, 8);
    }

    fn contents(reqs: &[Prepared]) -> Vec<String> {
        reqs.iter()
            .map(|r| {
                let text = std::str::from_utf8(&r.bytes).unwrap();
                let body = text.split_once("\r\n\r\n").unwrap().1;
                let v: Value = serde_json::from_str(body).unwrap();
                v["messages"][0]["content"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn synthetic_lengths_are_exact_tokens() {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for (input, lo, hi) in [
                (Lengths::Fixed(37), 37, 37),
                (Lengths::Uniform(1, 300), 1, 300),
                (Lengths::Normal(64.0, 20.0), 1, u64::MAX),
            ] {
                for seed in [0, 1, 42] {
                    let mut s = spec();
                    (s.input, s.tokenizer, s.seed) = (input, enc, seed);
                    let reqs = synthetic(&s).unwrap();
                    let texts = contents(&reqs);
                    let mut distinct = std::collections::HashSet::new();
                    for (r, text) in reqs.iter().zip(&texts) {
                        assert_eq!(enc.count(text).unwrap() as u64, r.input_tokens, "{text:?}");
                        assert!((lo..=hi).contains(&r.input_tokens), "{input:?}");
                        distinct.insert(r.input_tokens);
                    }
                    // The distributions really vary the length.
                    assert!(matches!(input, Lengths::Fixed(_)) || distinct.len() > 20);
                }
            }
        }
    }

    #[test]
    fn synthetic_is_deterministic_per_seed() {
        let mut s = spec();
        s.input = Lengths::Uniform(10, 50);
        let first = synthetic(&s).unwrap();
        let again = synthetic(&s).unwrap();
        assert!(first.iter().zip(&again).all(|(x, y)| x.bytes == y.bytes));
        s.seed = 2;
        let seed2 = synthetic(&s).unwrap();
        assert_ne!(contents(&first), contents(&seed2));
        // The lengths drawn depend on the seed only, not on the encoding.
        s.tokenizer = Encoding::Cl100kBase;
        let cl100k = synthetic(&s).unwrap();
        assert!(cl100k
            .iter()
            .zip(&seed2)
            .all(|(x, y)| x.input_tokens == y.input_tokens));
    }

    #[test]
    fn jsonl_bodies_get_cli_fields() {
        let mut s = spec();
        s.extra
            .insert("mock".into(), serde_json::json!({"words": 3}));
        let reqs = from_jsonl(
            &s,
            "{\"messages\":[{\"role\":\"user\",\"content\":\"a b c\"}]}\n\n",
        )
        .unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].input_tokens, 3); // "a b c": three o200k tokens
        let text = String::from_utf8(reqs[0].bytes.clone()).unwrap();
        assert!(text.contains("\"mock\":{\"words\":3}") && text.contains("\"model\":\"m\""));
        assert!(from_jsonl(&s, "[1]").is_err());
        assert!(from_jsonl(&s, "").is_err());
    }
}
