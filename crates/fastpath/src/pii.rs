//! PII and secret detection for the output guard: a regex finds candidates, a checksum or a
//! range rule confirms them (Luhn for cards, mod-97 for IBANs, the SSA's invalid SSN ranges), so
//! numbers that merely look like a card or an IBAN do not fire.
//!
//! One `RegexSet` pass answers "anything here?" for the common case of clean text; only text
//! that has a candidate pays for the per-kind searches. Every pattern but the unbounded tokens
//! (e-mail, API keys, JWTs: no whitespace inside) is at most 64 bytes long, which is what the
//! stream filter's hold-back window relies on (see `outguard.rs`).

use regex::{Regex, RegexSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Email,
    Phone,
    Card,
    Iban,
    Ssn,
    ApiKey,
    Jwt,
    PrivateKey,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Email,
        Kind::Phone,
        Kind::Card,
        Kind::Iban,
        Kind::Ssn,
        Kind::ApiKey,
        Kind::Jwt,
        Kind::PrivateKey,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card => "card",
            Kind::Iban => "iban",
            Kind::Ssn => "ssn",
            Kind::ApiKey => "api_key",
            Kind::Jwt => "jwt",
            Kind::PrivateKey => "private_key",
        }
    }

    #[must_use]
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn pattern(self) -> &'static str {
        match self {
            Kind::Email => {
                r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)+[A-Za-z]{2,24}\b"
            }
            // E.164 with optional separators, NANP "(415) 555-0132" / "415-555-0132", and
            // national trunk-prefixed numbers "020 7946 0958"; digit counts checked in `valid`.
            Kind::Phone => concat!(
                r"(?:\+[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){1,5}[ .-]?[0-9]{2,4}\b",
                r"|(?:^|[^0-9A-Za-z+])(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[-.])[2-9][0-9]{2}[-.][0-9]{4}\b",
                r"|\b0[1-9][0-9]{1,3}[ -][0-9]{3,4}[ -][0-9]{3,4}\b)"
            ),
            Kind::Card => r"\b[3-6][0-9](?:[ -]?[0-9]){11,17}\b",
            Kind::Iban => r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
            Kind::Ssn => r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
            Kind::ApiKey => concat!(
                r"\bsk-(?:proj-|svcacct-|ant-)?[A-Za-z0-9_-]{20,}",
                r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,}",
                r"|\bgithub_pat_[A-Za-z0-9_]{22,}",
                r"|\bxox[abposr]-[A-Za-z0-9-]{10,}",
                r"|\bAIza[0-9A-Za-z_-]{35}"
            ),
            Kind::Jwt => r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}",
            Kind::PrivateKey => r"-----BEGIN [A-Z0-9 ]{0,24}PRIVATE KEY(?: BLOCK)?-----",
        }
    }

    /// The checksum / range rule that confirms a regex candidate.
    fn valid(self, m: &str) -> bool {
        match self {
            Kind::Phone => {
                let digits = m.bytes().filter(u8::is_ascii_digit).count();
                (10..=15).contains(&digits)
            }
            Kind::Card => luhn_card(m),
            Kind::Iban => iban_ok(m),
            Kind::Ssn => ssn_ok(m),
            _ => true,
        }
    }
}

/// 13-19 digits whose Luhn sum is 0 mod 10; with separators, in the groups cards are printed
/// in (4-4-4-4[-3|4], Amex 4-6-5, Diners 4-6-4), which keeps digit runs of other IDs out.
fn luhn_card(m: &str) -> bool {
    let groups: Vec<usize> = m.split([' ', '-']).map(str::len).collect();
    let grouped = match groups.as_slice() {
        [_] | [4, 6, 4 | 5] => true,
        [init @ .., last] => init.iter().all(|g| *g == 4) && (3..=4).contains(last),
        [] => false,
    };
    if !grouped {
        return false;
    }
    let digits: Vec<u32> = m.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// ISO 13616: 15-34 alphanumerics, country letters then check digits; mod 97 of the rearranged
/// number is 1.
fn iban_ok(m: &str) -> bool {
    let s: Vec<u8> = m.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in s[4..].iter().chain(&s[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// US SSN `AAA-GG-SSSS`: area not 000, 666 or 9xx; group not 00; serial not 0000.
fn ssn_ok(m: &str) -> bool {
    let mut parts = m.split('-');
    let (Some(a), Some(g), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    a != "000" && a != "666" && !a.starts_with('9') && g != "00" && s != "0000"
}

/// One confirmed finding: its kind and byte span in the scanned text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct Detector {
    kinds: Vec<Kind>,
    set: RegexSet,
    regexes: Vec<Regex>,
    key_end: Regex,
}

impl Detector {
    pub fn new(kinds: &[Kind]) -> Result<Self, String> {
        let mut ks: Vec<Kind> = Vec::new();
        for k in kinds {
            if !ks.contains(k) {
                ks.push(*k);
            }
        }
        let set = RegexSet::new(ks.iter().map(|k| k.pattern())).map_err(|e| e.to_string())?;
        let regexes = ks
            .iter()
            .map(|k| Regex::new(k.pattern()).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let key_end = Regex::new(r"-----END [A-Z0-9 ]{0,24}PRIVATE KEY(?: BLOCK)?-----")
            .map_err(|e| e.to_string())?;
        Ok(Self {
            kinds: ks,
            set,
            regexes,
            key_end,
        })
    }

    #[must_use]
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// Confirmed findings in `text`, sorted, without overlaps (the earliest, then longest, wins).
    pub fn scan(&self, text: &str, out: &mut Vec<Hit>) {
        out.clear();
        let matched = self.set.matches(text);
        if !matched.matched_any() {
            return;
        }
        for i in &matched {
            let (Some(&kind), Some(re)) = (self.kinds.get(i), self.regexes.get(i)) else {
                continue;
            };
            for m in re.find_iter(text) {
                let (mut start, end) = (m.start(), m.end());
                let mut s = m.as_str();
                if kind == Kind::Phone {
                    // the NANP branch consumes the character before the number
                    let trimmed = s.trim_start_matches(|c: char| {
                        !(c.is_ascii_digit() || c == '(' || c == '+')
                    });
                    start += s.len() - trimmed.len();
                    s = trimmed;
                }
                if kind.valid(s) {
                    out.push(Hit { kind, start, end });
                }
            }
        }
        out.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut last_end = 0;
        out.retain(|h| {
            if h.start < last_end {
                return false;
            }
            last_end = h.end;
            true
        });
    }

    /// Where a private key block that opened before `from` ends (after its END line), if in `text`.
    #[must_use]
    pub fn key_block_end(&self, text: &str, from: usize) -> Option<usize> {
        self.key_end.find_at(text, from).map(|m| m.end())
    }
}

/// The mask written in place of a redacted finding.
#[must_use]
pub fn mask(kind: Kind) -> String {
    format!("[REDACTED:{}]", kind.name())
}

/// `text` with every finding of a `redact` kind masked (a private key up to its END line, or to
/// the end of the text); also returns every finding, redacted or not.
pub fn redact(
    det: &Detector,
    text: &str,
    redact_kind: impl Fn(Kind) -> bool,
) -> (String, Vec<Hit>) {
    let mut hits = Vec::new();
    det.scan(text, &mut hits);
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    for h in &hits {
        if h.start < pos {
            continue; // inside a private key block already masked
        }
        out.push_str(text.get(pos..h.start).unwrap_or(""));
        if redact_kind(h.kind) {
            out.push_str(&mask(h.kind));
            pos = if h.kind == Kind::PrivateKey {
                det.key_block_end(text, h.end).unwrap_or(text.len())
            } else {
                h.end
            };
        } else {
            out.push_str(text.get(h.start..h.end).unwrap_or(""));
            pos = h.end;
        }
    }
    out.push_str(text.get(pos..).unwrap_or(""));
    (out, hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds_in(text: &str) -> Vec<&'static str> {
        let det = Detector::new(&Kind::ALL).unwrap_or_else(|e| unreachable!("{e}"));
        let mut hits = Vec::new();
        det.scan(text, &mut hits);
        hits.iter().map(|h| h.kind.name()).collect()
    }

    fn one(text: &str, kind: &str) {
        assert_eq!(kinds_in(text), vec![kind], "{text:?}");
    }

    fn none(text: &str) {
        assert!(kinds_in(text).is_empty(), "{text:?}: {:?}", kinds_in(text));
    }

    #[test]
    fn emails() {
        one("write to jane.doe+news@example.co.uk today", "email");
        one("<a.b@mail-server.org>", "email");
        none("the @decorator and user@localhost and a@b");
    }

    #[test]
    fn phones() {
        one("call +1 415 555 0132 now", "phone");
        one("call +14155550132.", "phone");
        one("UK: +44 20 7946 0958", "phone");
        one("office (415) 555-0132", "phone");
        one("office 415-555-0132", "phone");
        one("London 020 7946 0958", "phone");
        none("version 1.2.3, port 8080, 2024-01-15, +5 points, 123-456-7890");
        none("ISBN 978-3-16-148410-0 and 10.0.0.1");
    }

    #[test]
    fn cards() {
        one("card 4111 1111 1111 1111 exp", "card");
        one("card 4111-1111-1111-1111", "card");
        one("amex 378282246310005", "card");
        one("mc 5555555555554444", "card");
        none("card 4111 1111 1111 1112"); // Luhn-invalid
        none("id 5555555555554445");
        none("ts 1700000000000 and 1234567890123456"); // bad prefix
        none("ref 3704 0044 0532 0130 01"); // Luhn-valid, but not grouped as a card
    }

    #[test]
    fn ibans() {
        one("IBAN DE89 3704 0044 0532 0130 00.", "iban");
        one("GB82WEST12345698765432", "iban");
        none("IBAN DE89 3704 0044 0532 0130 01"); // mod-97 fails
        none("GB82WEST12345698765433");
    }

    #[test]
    fn ssns() {
        one("SSN 123-45-6789", "ssn");
        none("SSN 000-45-6789 666-45-6789 900-45-6789 123-00-6789 123-45-0000");
    }

    #[test]
    fn secrets() {
        one("key sk-proj-abcdefghijklmnopqrstuvwx12", "api_key");
        one("AKIAIOSFODNN7EXAMPLE", "api_key");
        one("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "api_key");
        one("xoxb-1234567890-abcdefghij", "api_key");
        none("sk-short and task-runner and AKIA123");
        one(
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "jwt",
        );
        none("eyJhbGciOiJIUzI1NiJ9 alone");
        one(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
            "private_key",
        );
        one("-----BEGIN PRIVATE KEY-----", "private_key");
        none("-----BEGIN PUBLIC KEY-----");
    }

    #[test]
    fn redaction_masks_and_key_blocks() {
        let det = Detector::new(&Kind::ALL).unwrap_or_else(|e| unreachable!("{e}"));
        let (out, hits) = redact(&det, "mail a@example.com, card 4111111111111111.", |_| true);
        assert_eq!(out, "mail [REDACTED:email], card [REDACTED:card].");
        assert_eq!(hits.len(), 2);
        let (out, _) = redact(
            &det,
            "x -----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY----- y",
            |_| true,
        );
        assert_eq!(out, "x [REDACTED:private_key] y");
        let (out, _) = redact(&det, "a@example.com", |k| k != Kind::Email);
        assert_eq!(out, "a@example.com");
    }
}
