"""Text cut into sentences for classifier guards (`guard`'s `sentences: true`, and every reply
check of `output_classifier`): an embedding classifier mean-pools over its whole input, so one
toxic sentence among benign ones scores low when they are scored together (toxicity_guard: 0.99
alone, 0.16 after 150 benign characters); scored one by one, the worst sentence decides."""

from __future__ import annotations

import re

#: where a sentence ends: its terminator (and a closing quote or bracket), then white space
_SENTENCE_END = re.compile(r"[.!?;:\n][\"')\]]*\s+|\n")
#: sentences shorter than this are scored with the next one (a word or two means nothing alone)
MIN_SEGMENT = 60


def boundary(text: str, start: int) -> int:
    """The end of the last whole sentence in `text[start:]` (`start` when there is none)."""
    end = start
    for m in _SENTENCE_END.finditer(text, start):
        end = m.end()
    return end


def segments(text: str, max_chars: int) -> list[str]:
    """`text` cut into sentences to score one by one. Short sentences join the next; a sentence
    longer than `max_chars` is cut into pieces of that size."""
    out: list[str] = []
    cur = ""
    last = 0
    for m in _SENTENCE_END.finditer(text):
        cur += text[last : m.end()]
        last = m.end()
        if len(cur.strip()) >= MIN_SEGMENT:
            out += _cut(cur, max_chars)
            cur = ""
    cur += text[last:]
    if cur.strip():
        out += _cut(cur, max_chars)
    return out


def _cut(sentence: str, max_chars: int) -> list[str]:
    s = sentence.strip()
    return [s[i : i + max_chars] for i in range(0, len(s), max_chars)]
