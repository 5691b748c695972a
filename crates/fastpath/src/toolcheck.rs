//! Tool-call validation: a model's call is checked against the request's `tools` (the name is
//! offered, the arguments are JSON, they match the tool's JSON Schema) with the maintained
//! `jsonschema` validator (draft auto-detected, no remote `$ref`s: nothing is fetched).
//!
//! `ToolAssembler` rebuilds a stream's calls from its OpenAI chunk frames (arguments arrive in
//! pieces per call index), so a stream's calls are checked once they are complete.

use serde_json::Value;

use crate::sse::{Event, Parser, SseError};

pub struct ToolSet {
    tools: Vec<(String, Option<jsonschema::Validator>)>,
}

impl std::fmt::Debug for ToolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tools.iter().map(|(n, _)| n))
            .finish()
    }
}

impl ToolSet {
    /// `tools`: the request's `tools` array (JSON). A tool without `parameters` takes any object.
    pub fn new(tools: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(tools).map_err(|e| format!("tools: {e}"))?;
        let Value::Array(list) = v else {
            return Err("tools: not a list".into());
        };
        let mut out = Vec::with_capacity(list.len());
        for t in list {
            let Some(f) = t.get("function") else { continue };
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                continue;
            };
            let validator = match f.get("parameters") {
                Some(schema) if !schema.is_null() => Some(
                    jsonschema::validator_for(schema)
                        .map_err(|e| format!("tool `{name}`: invalid JSON Schema: {e}"))?,
                ),
                _ => None,
            };
            out.push((name.to_owned(), validator));
        }
        Ok(Self { tools: out })
    }

    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.tools.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// None: the call is valid; else why not (for the client and the repair turn).
    #[must_use]
    pub fn check(&self, name: &str, arguments: &str) -> Option<String> {
        let Some((_, validator)) = self.tools.iter().find(|(n, _)| n == name) else {
            return Some(format!(
                "unknown tool `{name}`: the request offers no such tool"
            ));
        };
        let args: Value = match serde_json::from_str(arguments) {
            Ok(v) => v,
            Err(e) => return Some(format!("arguments of `{name}` are not valid JSON: {e}")),
        };
        let validator = validator.as_ref()?;
        let errors: Vec<String> = validator
            .iter_errors(&args)
            .take(3)
            .map(|e| {
                let path = e.instance_path.to_string();
                let at = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                format!("at {at}: {e}")
            })
            .collect();
        if errors.is_empty() {
            None
        } else {
            Some(format!(
                "arguments of `{name}` do not match its schema: {}",
                errors.join("; ")
            ))
        }
    }
}

/// One call as assembled: (choice index, call index, name, arguments).
pub type Call = (u64, u64, String, String);

#[derive(Debug)]
pub struct ToolAssembler {
    parser: Parser,
    calls: Vec<Call>,
}

impl ToolAssembler {
    #[must_use]
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            parser: Parser::new(max_event_bytes),
            calls: Vec::new(),
        }
    }

    pub fn feed(&mut self, frames: &[u8]) -> Result<(), SseError> {
        let calls = &mut self.calls;
        self.parser
            .feed(frames, &mut |e: &Event<'_>| add(calls, e.data))
    }

    #[must_use]
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }
}

fn add(calls: &mut Vec<Call>, data: &[u8]) {
    // cheap skip: a frame without tool calls is not parsed
    if memchr::memmem::find(data, b"\"tool_calls\"").is_none() {
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return;
    };
    for c in choices {
        let ci = c.get("index").and_then(Value::as_u64).unwrap_or(0);
        let Some(list) = c.pointer("/delta/tool_calls").and_then(Value::as_array) else {
            continue;
        };
        for t in list {
            let ti = t.get("index").and_then(Value::as_u64).unwrap_or(0);
            let name = t.pointer("/function/name").and_then(Value::as_str);
            let piece = t
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            if let Some(call) = calls.iter_mut().find(|x| x.0 == ci && x.1 == ti) {
                if let Some(n) = name {
                    call.2.push_str(n);
                }
                call.3.push_str(piece);
            } else {
                calls.push((ci, ti, name.unwrap_or("").to_owned(), piece.to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer","minimum":1}},"required":["city"],"additionalProperties":false}}},{"type":"function","function":{"name":"now"}}]"#;

    #[test]
    fn checks_name_json_and_schema() {
        let set = ToolSet::new(TOOLS.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(set.names(), vec!["get_weather", "now"]);
        assert_eq!(
            set.check("get_weather", r#"{"city":"Paris","days":2}"#),
            None
        );
        assert_eq!(set.check("now", "{}"), None);
        assert!(set
            .check("delete_all", "{}")
            .is_some_and(|e| e.contains("unknown tool")));
        assert!(set
            .check("get_weather", r#"{"city":"Pa"#)
            .is_some_and(|e| e.contains("not valid JSON")));
        let e = set
            .check("get_weather", r#"{"days":0}"#)
            .unwrap_or_default();
        assert!(e.contains("city") && e.contains("/days"), "{e}");
        assert!(set.check("get_weather", r#"{"city":"P","x":1}"#).is_some());
    }

    #[test]
    fn invalid_schema_is_an_error() {
        let bad = r#"[{"type":"function","function":{"name":"f","parameters":{"type":"nope"}}}]"#;
        assert!(ToolSet::new(bad.as_bytes()).is_err());
        assert!(ToolSet::new(b"{}").is_err());
    }

    #[test]
    fn assembles_calls_from_frames() {
        let mut a = ToolAssembler::new(1 << 20);
        let frames = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"ci\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"ty\\\":\\\"Paris\\\"}\"}}]}}]}\n\n",
        );
        let (x, y) = frames.split_at(40);
        a.feed(x.as_bytes()).unwrap_or_default();
        a.feed(y.as_bytes()).unwrap_or_default();
        assert_eq!(
            a.calls(),
            &[(
                0,
                0,
                "get_weather".to_owned(),
                r#"{"city":"Paris"}"#.to_owned()
            )]
        );
    }
}
