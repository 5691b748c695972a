//! Exact-length synthetic prompts with OpenAI's BPE vocabularies: the gateway's own encoder
//! (`fastpath::tokens`, vocabularies bundled in the binary: no downloads, no Python), so the
//! bench counts tokens exactly as the gateway does.
//!
//! Prompts are built piece by piece from words that are one token each in the chosen encoding
//! (checked per word and form: `"Word"`, `" word"`, `" Word"`), plus `","` and `"."`. Both BPE
//! pre-tokenizers cut text at every such boundary, so the pieces' counts add up; every prompt is
//! then encoded once more to verify, and trimmed (decode of the first N tokens) or extended until
//! its count is exact. All of it happens before the run, never in the request loop.

use crate::schedule::Rng;
pub use fastpath::tokens::Encoding;
use fastpath::tokens::TokenError;

#[expect(clippy::needless_pass_by_value, reason = "used as `map_err(text)`")]
fn text(e: TokenError) -> String {
    e.to_string()
}

/// Plain English words; those that are not one token in every form under an encoding are dropped
/// for it.
const VOCAB: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "world",
    "water",
    "house",
    "light",
    "river",
    "city",
    "music",
    "story",
    "model",
    "number",
    "table",
    "paper",
    "system",
    "market",
    "after",
    "before",
    "under",
    "over",
    "between",
    "about",
    "into",
    "through",
    "during",
    "without",
    "again",
    "always",
    "never",
    "often",
    "still",
    "also",
    "only",
    "very",
    "just",
    "then",
    "now",
    "here",
    "where",
    "while",
    "because",
    "small",
    "large",
    "long",
    "short",
    "new",
    "old",
    "good",
    "great",
    "high",
    "low",
    "early",
    "late",
    "young",
    "important",
    "public",
    "local",
    "national",
    "different",
    "same",
    "other",
    "first",
    "last",
    "next",
    "few",
    "many",
    "most",
    "some",
    "each",
    "every",
    "day",
    "night",
    "week",
    "month",
    "life",
    "work",
    "school",
    "family",
    "group",
    "country",
    "problem",
    "service",
    "place",
    "hand",
    "part",
    "case",
    "point",
    "government",
    "company",
    "question",
    "fact",
    "power",
    "money",
    "road",
    "street",
    "door",
    "window",
    "tree",
    "garden",
    "field",
    "mountain",
    "sea",
    "ship",
    "train",
    "car",
    "book",
    "letter",
    "word",
    "name",
    "voice",
    "song",
    "game",
    "team",
    "friend",
    "child",
    "woman",
    "man",
    "teacher",
    "doctor",
    "student",
    "leader",
    "member",
    "office",
    "room",
    "food",
    "bread",
    "coffee",
    "tea",
    "fire",
    "stone",
    "glass",
    "metal",
    "color",
    "sound",
    "idea",
    "plan",
    "reason",
    "result",
    "change",
    "moment",
    "history",
    "science",
    "art",
    "nature",
    "energy",
    "data",
    "network",
    "signal",
    "record",
    "report",
    "make",
    "take",
    "give",
    "find",
    "keep",
    "hold",
    "bring",
    "write",
    "read",
    "speak",
    "build",
    "open",
    "close",
    "begin",
    "follow",
    "carry",
    "watch",
    "learn",
    "move",
    "live",
    "turn",
];

/// One usable word: each form is exactly one token.
struct Word {
    /// `"Word"` (the very first piece of a prompt).
    bare_cap: String,
    /// `" word"`.
    spaced: String,
    /// `" Word"` (after a period).
    spaced_cap: String,
}

/// Seeded generator of prompts with an exact token count.
pub struct PromptGen {
    enc: Encoding,
    words: Vec<Word>,
}

fn capitalize(w: &str) -> String {
    let mut c = w.chars();
    c.next().map_or_else(String::new, |f| {
        f.to_uppercase().chain(c).collect::<String>()
    })
}

impl PromptGen {
    pub fn new(enc: Encoding) -> Result<Self, String> {
        let count = |s: &str| enc.count(s).map_err(text);
        for punct in [",", "."] {
            if count(punct)? != 1 {
                return Err(format!("{punct:?} is not one {} token", enc.name()));
            }
        }
        let mut words = Vec::with_capacity(VOCAB.len());
        for w in VOCAB {
            let word = Word {
                bare_cap: capitalize(w),
                spaced: format!(" {w}"),
                spaced_cap: format!(" {}", capitalize(w)),
            };
            if count(&word.bare_cap)? == 1
                && count(&word.spaced)? == 1
                && count(&word.spaced_cap)? == 1
            {
                words.push(word);
            }
        }
        if words.len() < 32 {
            return Err(format!(
                "only {} one-token words under {}",
                words.len(),
                enc.name()
            ));
        }
        Ok(Self { enc, words })
    }

    #[must_use]
    pub const fn encoding(&self) -> Encoding {
        self.enc
    }

    fn word(&self, rng: &mut Rng) -> &Word {
        &self.words[(rng.next_u64() % self.words.len() as u64) as usize]
    }

    /// Sentences of 5-16 words with the odd comma, cut at exactly `n` tokens of the encoding.
    pub fn prompt(&self, rng: &mut Rng, n: usize) -> Result<String, String> {
        let mut s = String::with_capacity(n * 7);
        let mut tokens = 0;
        let mut left_in_sentence = 0;
        while tokens < n {
            if left_in_sentence == 0 {
                if tokens > 0 {
                    s.push('.');
                    tokens += 1;
                    if tokens == n {
                        break;
                    }
                }
                left_in_sentence = rng.range(5, 16);
                let w = self.word(rng);
                s.push_str(if tokens == 0 {
                    &w.bare_cap
                } else {
                    &w.spaced_cap
                });
            } else if left_in_sentence > 2 && rng.next_u64() % 12 == 0 {
                s.push(',');
                tokens += 1;
                continue;
            } else {
                s.push_str(&self.word(rng).spaced);
            }
            tokens += 1;
            left_in_sentence -= 1;
        }
        self.make_exact(rng, s, n)
    }

    /// Verify by encoding; trim at token granularity or extend by words until the count is `n`.
    fn make_exact(&self, rng: &mut Rng, mut s: String, n: usize) -> Result<String, String> {
        for _ in 0..16 {
            let toks = self.enc.encode(&s).map_err(text)?;
            match toks.len().cmp(&n) {
                std::cmp::Ordering::Equal => return Ok(s),
                std::cmp::Ordering::Greater => s = self.enc.decode(&toks[..n]).map_err(text)?,
                std::cmp::Ordering::Less => {
                    for _ in toks.len()..n {
                        s.push_str(&self.word(rng).spaced);
                    }
                }
            }
        }
        Err(format!(
            "could not build a prompt of exactly {n} {} tokens",
            self.enc.name()
        ))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BOTH: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];

    #[test]
    fn names_round_trip() {
        for e in BOTH {
            assert_eq!(Encoding::from_name(e.name()).unwrap(), e);
        }
        assert!(Encoding::from_name("p50k_base").is_err());
    }

    #[test]
    fn known_counts_and_decode() {
        // Reference values from the Python `tiktoken` package.
        assert_eq!(
            Encoding::Cl100kBase.encode("hello world").unwrap(),
            [15339, 1917]
        );
        assert_eq!(
            Encoding::O200kBase.encode("hello world").unwrap(),
            [24912, 2375]
        );
        assert_eq!(
            Encoding::O200kBase.decode(&[24912, 2375]).unwrap(),
            "hello world"
        );
        assert_eq!(Encoding::O200kBase.count("").unwrap(), 0);
    }

    #[test]
    fn most_words_survive_the_filter() {
        for e in BOTH {
            let g = PromptGen::new(e).unwrap();
            assert!(g.words.len() * 10 >= VOCAB.len() * 8, "{}", g.words.len());
        }
    }

    #[test]
    fn prompts_are_exact_in_tokens() {
        for e in BOTH {
            let g = PromptGen::new(e).unwrap();
            for seed in 0..4 {
                let mut rng = Rng::new(seed);
                for n in (0..40).chain([63, 64, 100, 257, 1000]) {
                    let p = g.prompt(&mut rng, n).unwrap();
                    assert_eq!(e.count(&p).unwrap(), n, "{} seed {seed}: {p:?}", e.name());
                }
            }
        }
    }

    #[test]
    fn make_exact_trims_and_extends() {
        let e = Encoding::O200kBase;
        let g = PromptGen::new(e).unwrap();
        let mut rng = Rng::new(7);
        // Digits and whitespace runs merge differently from word pieces; the fix-up still lands.
        let messy = "1234567 hello   world\n\n\nfoo!!! bar".to_string();
        for n in [1, 3, 5, 20, 50] {
            let p = g.make_exact(&mut rng, messy.clone(), n).unwrap();
            assert_eq!(e.count(&p).unwrap(), n, "{p:?}");
        }
    }

    #[test]
    fn prompts_read_like_sentences() {
        let g = PromptGen::new(Encoding::O200kBase).unwrap();
        let p = g.prompt(&mut Rng::new(1), 60).unwrap();
        assert!(p.chars().next().unwrap().is_uppercase(), "{p:?}");
        assert!(p.contains(". "), "{p:?}");
        assert!(!p.starts_with(' '), "{p:?}");
    }
}
