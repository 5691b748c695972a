//! Bounded, deterministic fuzzing of the stream parsers: wherever the network splits the bytes,
//! the result is the same, and (for generated well-formed streams) what a plain reference says.
//!
//! A fixed-seed xorshift drives every case, so a failure reproduces exactly; the case counts keep
//! the whole file to a few seconds in a debug build.

#![expect(clippy::unwrap_used, clippy::panic, reason = "tests")]

use _fastpath::reframe::Reframer;
use _fastpath::sse::{Event, Parser};
use _fastpath::textstream::TextStream;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;

/// xorshift64*: small, fast, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// 0-4 sorted cut points in `0..=len` (repeats allowed: empty feeds happen too).
    fn cuts(&mut self, len: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (0..self.below(5)).map(|_| self.below(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }
}

/// `bytes` cut at `cuts` (sorted), the pieces in order.
fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut last = 0;
    for &c in cuts {
        out.push(&bytes[last..c]);
        last = c;
    }
    out.push(&bytes[last..]);
    out
}

/// Every way of cutting `bytes` that a case tries: whole, byte by byte, and a few random cuts.
fn splittings<'a>(rng: &mut Rng, bytes: &'a [u8], random: usize) -> Vec<Vec<&'a [u8]>> {
    let mut all = vec![vec![bytes], bytes.chunks(1).collect()];
    for _ in 0..random {
        let cuts = rng.cuts(bytes.len());
        all.push(pieces(bytes, &cuts));
    }
    all
}

/// Text mixing 1-, 2-, 3- and 4-byte UTF-8 characters, with some SSE-significant ASCII.
fn random_text(rng: &mut Rng, max_chars: usize) -> String {
    const RANGES: &[(u32, u32)] = &[
        (0x20, 0x7E),
        (0x20, 0x7E),
        (0x0A, 0x0D),
        (0xA0, 0x24F),
        (0x370, 0x4FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1_F300, 0x1_FAFF),
        (0x0, 0x10_FFFF),
    ];
    let n = rng.below(max_chars + 1);
    let mut s = String::new();
    while s.chars().count() < n {
        let (lo, hi) = rng.pick(RANGES);
        let span = usize::try_from(hi - lo + 1).unwrap();
        let cp = lo + u32::try_from(rng.below(span)).unwrap();
        if let Some(c) = char::from_u32(cp) {
            s.push(c);
        }
    }
    s
}

// ---- (a) the SSE parser -----------------------------------------------------------------------

type Owned = (Option<String>, Vec<u8>, Option<String>, Option<u64>);

/// Events dispatched, and whether the size limit stopped the stream (feeding stops there).
fn parse(pieces: &[&[u8]], limit: usize) -> (Vec<Owned>, bool) {
    let mut p = Parser::new(limit);
    let mut events = Vec::new();
    let mut push = |e: &Event<'_>| {
        events.push((
            e.event.map(str::to_owned),
            e.data.to_vec(),
            e.id.map(str::to_owned),
            e.retry,
        ));
    };
    for piece in pieces {
        if p.feed(piece, &mut push).is_err() {
            return (events, true);
        }
    }
    p.flush(&mut push);
    (events, false)
}

/// SSE-ish bytes: field lines of every kind, comments, BOMs, all three line ends, odd bytes.
fn random_sse(rng: &mut Rng) -> Vec<u8> {
    const FIELDS: &[&[u8]] = &[
        b"data:",
        b"data: ",
        b"data",
        b"event: ",
        b"id: ",
        b"id:\x00",
        b"retry: ",
        b": ",
        b"",
        b"\xEF\xBB\xBF",
        b"dat",
        b"x: ",
    ];
    const ENDS: &[&[u8]] = &[b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"\r\r"];
    let mut out = Vec::new();
    if rng.chance(4) {
        out.extend_from_slice(b"\xEF\xBB\xBF");
    }
    for _ in 0..rng.below(24) {
        out.extend_from_slice(rng.pick(FIELDS));
        if rng.chance(3) {
            out.extend_from_slice(rng.below(100_000).to_string().as_bytes());
        } else {
            let text = random_text(rng, 12);
            out.extend_from_slice(text.as_bytes());
        }
        if !rng.chance(8) {
            out.extend_from_slice(rng.pick(ENDS));
        }
    }
    out
}

// Hunts: events (or the size-limit error) that depend on where the input was split.
#[test]
fn sse_events_do_not_depend_on_splits() {
    let mut rng = Rng::new(1);
    for case in 0..1000 {
        let bytes = random_sse(&mut rng);
        let limit = rng.pick(&[usize::MAX, 1 << 20, 64, 16, 4]);
        let whole = parse(&[&bytes], limit);
        for split in splittings(&mut rng, &bytes, 4) {
            assert_eq!(
                parse(&split, limit),
                whole,
                "case {case}: {bytes:?} {split:?}"
            );
        }
    }
}

// Hunts: a well-formed event whose data is lost or altered (reference: the data lines joined).
#[test]
fn sse_data_round_trips() {
    let mut rng = Rng::new(2);
    for case in 0..300 {
        let payloads: Vec<String> = (0..=rng.below(6))
            .map(|_| random_text(&mut rng, 20))
            .collect();
        let mut bytes = Vec::new();
        for p in &payloads {
            let end: &[u8] = rng.pick(&[&b"\n"[..], b"\r\n", b"\r"]);
            // One `data:` line per line of the payload (CR, LF and CRLF all end lines).
            for line in p.replace("\r\n", "\n").replace('\r', "\n").split('\n') {
                bytes.extend_from_slice(b"data: ");
                bytes.extend_from_slice(line.as_bytes());
                bytes.extend_from_slice(end);
            }
            bytes.extend_from_slice(end);
        }
        let want: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| p.replace("\r\n", "\n").replace('\r', "\n").into_bytes())
            .collect();
        for split in splittings(&mut rng, &bytes, 3) {
            let (events, failed) = parse(&split, usize::MAX);
            assert!(!failed);
            let got: Vec<Vec<u8>> = events.into_iter().map(|e| e.1).collect();
            assert_eq!(got, want, "case {case}: {bytes:?}");
        }
    }
}

// ---- (b) the OpenAI stream re-framer ----------------------------------------------------------

/// Everything a `Reframer` reports after a stream.
#[derive(Debug, PartialEq)]
struct Reframed {
    /// The bytes sent on (all of the generated inputs are UTF-8).
    out: String,
    done: bool,
    usage: Option<(u64, u64, u64)>,
    error: Option<String>,
    events: u64,
    invalid_events: u64,
    completion: String,
    finish_reason: Option<String>,
    chunk_id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
}

/// `assert_eq!`, but a differing `out` is shown from where it starts to differ.
fn assert_same(got: &Reframed, want: &Reframed, context: &dyn Fn() -> String) {
    if got.out != want.out {
        let at = got
            .out
            .bytes()
            .zip(want.out.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let from = (0..=at)
            .rev()
            .find(|&i| got.out.is_char_boundary(i))
            .unwrap_or(0);
        let tail = |s: &str| {
            s.get(from..)
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>()
        };
        panic!(
            "{}: output differs at byte {at}:\n got: {:?}\nwant: {:?}",
            context(),
            tail(&got.out),
            tail(&want.out)
        );
    }
    assert_eq!(got, want, "{}", context());
}

fn reframe(pieces: &[&[u8]], strip_usage: bool) -> Reframed {
    let mut r = Reframer::new(strip_usage, 1 << 20);
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(r.feed(piece).unwrap());
    }
    out.extend_from_slice(r.finish());
    Reframed {
        out: String::from_utf8(out).unwrap(),
        done: r.done(),
        usage: r
            .usage()
            .map(|u| (u.prompt_tokens, u.completion_tokens, u.total_tokens)),
        error: r.error().map(str::to_owned),
        events: r.events(),
        invalid_events: r.invalid_events(),
        completion: r.completion_text().to_owned(),
        finish_reason: r.finish_reason().map(str::to_owned),
        chunk_id: r.chunk_id().map(str::to_owned),
        model: r.model().map(str::to_owned),
        created: r.created(),
    }
}

/// The payloads of a plausible upstream stream: role, content / tool-call / legacy-text deltas,
/// a finish reason, maybe a usage chunk, maybe an error, maybe `[DONE]`.
fn random_openai_payloads(rng: &mut Rng) -> Vec<String> {
    let id = format!("chatcmpl-{}", rng.below(1000));
    let model = rng.pick(&["gpt-4o", "m\u{e9}t\u{e9}o", "local-llm"]);
    let created = i64::try_from(rng.below(2_000_000_000)).unwrap();
    let chunk = |choices: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": choices})
    };
    let mut payloads = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
    )];
    for _ in 0..rng.below(8) {
        let text = random_text(rng, 8);
        let choice = match rng.below(6) {
            0 => json!({"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": text}}]}}),
            1 => json!({"index": 0, "text": text, "finish_reason": null}),
            2 => json!({"delta": {"content": text}}),
            3 => json!({"index": 0, "delta": {"content": null}, "logprobs": {"content": [1, 2]}}),
            _ => json!({"index": 0, "delta": {"content": text}, "finish_reason": null}),
        };
        let mut choices = vec![choice];
        if rng.chance(5) {
            choices.push(
                json!({"index": 1, "delta": {"content": random_text(rng, 4)},
                                "finish_reason": "length"}),
            );
        }
        payloads.push(chunk(Value::Array(choices)));
    }
    let reason = rng.pick(&["stop", "length", "tool_calls"]);
    payloads.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": reason}]),
    ));
    if rng.chance(2) {
        let (p, c) = (rng.below(5000), rng.below(5000));
        let mut u = chunk(json!([]));
        u["usage"] = if rng.chance(3) {
            json!({"prompt_tokens": p, "completion_tokens": c})
        } else {
            json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
        };
        payloads.push(u);
    }
    if rng.chance(6) {
        payloads.push(json!({"error": {"message": random_text(rng, 6), "type": "server_error"}}));
    }
    let mut out: Vec<String> = payloads
        .iter()
        .map(|v| {
            if rng.chance(4) {
                serde_json::to_string_pretty(v).unwrap()
            } else {
                v.to_string()
            }
        })
        .collect();
    if !rng.chance(5) {
        out.push("[DONE]".to_owned());
    }
    out
}

/// The payloads on the wire, as upstreams vary it: line ends, `data:` spacing, comments,
/// `event`/`id` fields, one `data:` line per payload line, maybe no final blank line.
fn to_sse(rng: &mut Rng, payloads: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let end: &[u8] = rng.pick(&[&b"\n"[..], b"\r\n", b"\r"]);
        if rng.chance(4) {
            out.extend_from_slice(b": keep-alive");
            out.extend_from_slice(end);
            out.extend_from_slice(end);
        }
        if rng.chance(5) {
            out.extend_from_slice(b"event: message");
            out.extend_from_slice(end);
        }
        if rng.chance(5) {
            out.extend_from_slice(format!("id: {i}").as_bytes());
            out.extend_from_slice(end);
        }
        for line in p.split('\n') {
            // `data:` without the space only where the value does not start with one (a
            // single space after the colon is dropped).
            let spaced = line.starts_with(' ') || rng.chance(2);
            out.extend_from_slice(if spaced { b"data: " } else { b"data:" });
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(end);
        }
        // The last event may lack its blank line: `finish` still delivers it.
        if i + 1 < payloads.len() || !rng.chance(4) {
            out.extend_from_slice(end);
        }
    }
    out
}

/// A plain reading of the same payloads with `serde_json::Value`: what the re-framer must report.
fn reference(payloads: &[String], strip_usage: bool) -> Reframed {
    fn str_of(v: &Value) -> &str {
        v.as_str().unwrap_or("")
    }
    let mut r = Reframed {
        out: String::new(),
        done: false,
        usage: None,
        error: None,
        events: 0,
        invalid_events: 0,
        completion: String::new(),
        finish_reason: None,
        chunk_id: None,
        model: None,
        created: None,
    };
    for p in payloads {
        r.events += 1;
        if p == "[DONE]" {
            r.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(p).unwrap();
        r.chunk_id = r.chunk_id.or_else(|| v["id"].as_str().map(str::to_owned));
        r.model = r.model.or_else(|| v["model"].as_str().map(str::to_owned));
        r.created = r.created.or_else(|| v["created"].as_i64());
        if r.error.is_none() && v["error"].is_object() {
            // The error object as the upstream wrote it.
            let raw: HashMap<String, Box<RawValue>> = serde_json::from_str(p).unwrap();
            r.error = Some(raw["error"].get().to_owned());
        }
        let choices = v["choices"].as_array().map_or(&[][..], Vec::as_slice);
        for c in choices {
            // In key order, as the payload has them (serde_json's maps are sorted).
            for (key, value) in c.as_object().unwrap() {
                match key.as_str() {
                    "text" => r.completion.push_str(str_of(value)),
                    "delta" => {
                        for (k, d) in value.as_object().unwrap() {
                            if k == "content" {
                                r.completion.push_str(str_of(d));
                            } else if k == "tool_calls" {
                                for call in d.as_array().unwrap() {
                                    let args = &call["function"]["arguments"];
                                    r.completion.push_str(str_of(args));
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            if c["index"].as_u64().unwrap_or(0) == 0 {
                if let Some(reason) = c["finish_reason"].as_str() {
                    r.finish_reason = Some(reason.to_owned());
                }
            }
        }
        let mut emit = true;
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let (p, c) = (
                u["prompt_tokens"].as_u64().unwrap(),
                u["completion_tokens"].as_u64().unwrap(),
            );
            r.usage = Some((p, c, u["total_tokens"].as_u64().unwrap_or(p + c)));
            emit = !choices.is_empty() || !strip_usage;
        }
        if emit {
            // Re-emitted byte for byte, one `data: ` line per payload line.
            r.out.push_str("data: ");
            r.out.push_str(&p.replace('\n', "\ndata: "));
            r.out.push_str("\n\n");
        }
    }
    r
}

// Hunts: re-framed bytes or accounting that depend on read boundaries or stray from a JSON reading.
#[test]
fn reframer_matches_reference_however_split() {
    let mut rng = Rng::new(3);
    for case in 0..300 {
        let payloads = random_openai_payloads(&mut rng);
        let bytes = to_sse(&mut rng, &payloads);
        let strip_usage = rng.chance(2);
        let want = reference(&payloads, strip_usage);
        for split in splittings(&mut rng, &bytes, 3) {
            let got = reframe(&split, strip_usage);
            assert_same(&got, &want, &|| {
                format!("case {case}: {}", String::from_utf8_lossy(&bytes))
            });
        }
    }
}

// Hunts: split-dependence on junk (not JSON, wrong shapes, huge numbers, stray fields).
#[test]
fn reframer_on_junk_does_not_depend_on_splits() {
    const PAYLOADS: &[&str] = &[
        "[DONE]",
        " [DONE] ",
        "{}",
        "{",
        "not json",
        "null",
        "[]",
        r#"{"choices":null,"usage":null}"#,
        r#"{"choices":[null,{"delta":null}],"id":5}"#,
        r#"{"choices":[{"delta":{"content":"a\u00e9\ud83d\ude00"}}]}"#,
        r#"{"choices":[{"text":7}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":-1}}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#,
        r#"{"error":"plain string"}"#,
        r#"{"error":{"message":"x"}} trailing"#,
        r#"{"created":1e3}"#,
        r#"{"choices":[{"index":0,"finish_reason":"stop"},{"index":0,"finish_reason":"x"}]}"#,
    ];
    let mut rng = Rng::new(4);
    for case in 0..400 {
        let payloads: Vec<String> = (0..rng.below(8))
            .map(|_| {
                if rng.chance(4) {
                    random_text(&mut rng, 10)
                } else {
                    (rng.pick(PAYLOADS)).to_owned()
                }
            })
            .collect();
        let mut bytes = to_sse(&mut rng, &payloads);
        if rng.chance(3) {
            bytes.extend_from_slice(&random_sse(&mut rng));
        }
        let strip_usage = rng.chance(2);
        let whole = reframe(&[&bytes], strip_usage);
        for split in splittings(&mut rng, &bytes, 3) {
            assert_same(&reframe(&split, strip_usage), &whole, &|| {
                format!("case {case}: {}", String::from_utf8_lossy(&bytes))
            });
        }
    }
}

// ---- (c) the text stream (Triton deltas) ------------------------------------------------------

/// The text, and the concatenated `content` of the frames, after feeding `pieces`.
fn stream_text(pieces: &[&[u8]], stops: &[&str], tensors: bool) -> (String, String, bool) {
    let emitter = _fastpath::emit::ChunkEmitter::new("id", "m", 1).unwrap();
    let mut ts = TextStream::new(
        Some(emitter),
        stops.iter().map(|s| (*s).to_owned()).collect(),
    );
    let mut frames = Vec::new();
    for piece in pieces {
        if tensors {
            // A BYTES tensor of one or two elements holding the delta.
            let (a, b) = piece.split_at(piece.len() / 2);
            let mut raw = Vec::new();
            for part in [a, b] {
                raw.extend_from_slice(&u32::try_from(part.len()).unwrap().to_le_bytes());
                raw.extend_from_slice(part);
            }
            frames.extend_from_slice(&ts.push_tensor(&raw).unwrap());
        } else {
            frames.extend_from_slice(&ts.push_bytes(piece).unwrap());
        }
    }
    frames.extend_from_slice(&ts.finish("length").unwrap());
    // The content deltas, read back from the frames.
    let mut content = String::new();
    let mut p = Parser::new(usize::MAX);
    p.feed(&frames, &mut |e: &Event<'_>| {
        let v: Value = serde_json::from_slice(e.data).unwrap();
        content.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    })
    .unwrap();
    (ts.text().to_owned(), content, ts.stopped())
}

// Hunts: a character split across deltas (bytes or BYTES tensors) that comes out mangled or twice.
#[test]
fn text_stream_utf8_split_anywhere() {
    let mut rng = Rng::new(5);
    for case in 0..300 {
        let text = random_text(&mut rng, 40);
        let bytes = text.as_bytes();
        for split in splittings(&mut rng, bytes, 2) {
            let tensors = rng.chance(2);
            let (got, content, stopped) = stream_text(&split, &[], tensors);
            assert_eq!(got, text, "case {case}: {split:?}");
            assert_eq!(content, text, "case {case}");
            assert!(!stopped);
        }
    }
}

// Hunts: invalid UTF-8 replaced (U+FFFD) differently depending on where the deltas were cut.
#[test]
fn text_stream_invalid_utf8_split_anywhere() {
    let mut rng = Rng::new(6);
    for case in 0..300 {
        let mut bytes = random_text(&mut rng, 10).into_bytes();
        for _ in 0..rng.below(6) {
            let junk: &[u8] = rng.pick(&[
                &b"\x80"[..],
                b"\xC3",
                b"\xE2\x82",
                b"\xF0\x9F\x98",
                b"\xED\xA0\x80",
                b"\xFF",
                b"\xC0\xAF",
            ]);
            let at = rng.below(bytes.len() + 1);
            bytes.splice(at..at, junk.iter().copied());
        }
        let want = String::from_utf8_lossy(&bytes).into_owned();
        for split in splittings(&mut rng, &bytes, 3) {
            let (got, content, _) = stream_text(&split, &[], false);
            assert_eq!(got, want, "case {case}: {bytes:?} {split:?}");
            assert_eq!(content, want, "case {case}");
        }
    }
}

/// The text a stream of `text` shows with these stop sequences: up to the stop sequence that
/// is complete first (ends earliest; of those, the longest), as a token-by-token generator stops.
fn stop_reference(text: &str, stops: &[&str]) -> (String, bool) {
    let mut best: Option<(usize, usize)> = None; // (end, start)
    for stop in stops.iter().filter(|s| !s.is_empty()) {
        if let Some(start) = text.find(stop) {
            let cand = (start + stop.len(), start);
            best = Some(best.map_or(cand, |b| {
                if cand.0 < b.0 || (cand.0 == b.0 && cand.1 < b.1) {
                    cand
                } else {
                    b
                }
            }));
        }
    }
    best.map_or_else(
        || (text.to_owned(), false),
        |(_, start)| (text[..start].to_owned(), true),
    )
}

// Hunts: stop sequences (overlapping too) missed, misplaced or leaking, depending on the splits.
#[test]
fn text_stream_stops_split_anywhere() {
    const ALPHABET: &[&str] = &["a", "b", "é", "日", "😀", "\n", " "];
    let mut rng = Rng::new(7);
    for case in 0..1000 {
        let word =
            |rng: &mut Rng, n: usize| -> String { (0..n).map(|_| rng.pick(ALPHABET)).collect() };
        let len = rng.below(30);
        let text = word(&mut rng, len);
        let chars: Vec<char> = text.chars().collect();
        let stops: Vec<String> = (0..rng.below(4))
            .map(|_| {
                let len = 1 + rng.below(3);
                if chars.len() >= len && rng.chance(2) {
                    // A piece of the text: stops that do fire, and overlap.
                    let from = rng.below(chars.len() - len + 1);
                    chars[from..from + len].iter().collect()
                } else {
                    word(&mut rng, len)
                }
            })
            .collect();
        let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
        let want = stop_reference(&text, &stops);
        for split in splittings(&mut rng, text.as_bytes(), 3) {
            let (got, content, stopped) = stream_text(&split, &stops, false);
            assert_eq!(
                (got.clone(), stopped),
                want,
                "case {case}: {text:?} {stops:?}"
            );
            assert_eq!(content, got, "case {case}");
        }
    }
}
