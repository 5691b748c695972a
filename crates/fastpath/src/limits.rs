//! Request guards that run before the body is decoded: a nesting-depth check that never
//! recurses, so a hostile `[[[[…` cannot exhaust the decoder's stack.

use memchr::memchr2;

/// Whether the JSON text nests arrays/objects deeper than `limit`. Strings are skipped
/// (escapes honoured); malformed JSON is not an error here: the decoder reports it.
#[must_use]
pub fn json_depth_exceeds(body: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = body.get(i) {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' => loop {
                // Jump from quote to backslash to quote; `i` ends on the closing quote.
                let Some(rest) = body.get(i + 1..) else {
                    return false;
                };
                match memchr2(b'"', b'\\', rest) {
                    None => return false, // unterminated string
                    Some(j) if rest[j] == b'\\' => i += j + 2,
                    Some(j) => {
                        i += j + 1;
                        break;
                    }
                }
            },
            _ => {}
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::json_depth_exceeds as exceeds;

    #[test]
    fn counts_nesting_not_brackets_in_strings() {
        assert!(!exceeds(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(exceeds(br#"{"a":[1,{"b":2}]}"#, 2));
        assert!(!exceeds(br#"["[[[[", "\"[[[", "\\", [1]]"#, 2));
        assert!(exceeds(br#"["\\", [[1]]]"#, 2));
        assert!(!exceeds(b"[[[]][[]]]", 3));
        assert!(exceeds(b"[[[[]]]]", 3));
    }

    #[test]
    fn malformed_input_is_not_an_error() {
        for body in [
            &b""[..],
            b"]]]]",
            b"\"unterminated [[[",
            b"\"ends in \\",
            b"1[",
            b"}{",
        ] {
            assert!(!exceeds(body, 1), "{body:?}");
        }
        assert!(!exceeds(b"[\"\\", 1));
        assert!(exceeds(&b"[".repeat(100_000), 64));
    }
}
