"""Split a text into windows of at most N tokens overlapping by at most M tokens; each chunk is an exact slice
of the text. Window edges prefer paragraph starts, then line starts, so a heading stays with its section."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.errors import ConfigError

DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40
SECTION, PARAGRAPH, LINE, ANYWHERE = 3, 2, 1, 0
# a reST title (optionally overlined) or a Markdown '#' heading, matched at a line start
_HEADING = re.compile(r"^(?:([=\-~^\"'`#*+])\1{2,}\n)?[^\n]*\S[^\n]*\n([=\-~^\"'`#*+])\2{2,}[ \t]*$|^#{1,6} \S",
                      re.MULTILINE)


@dataclass(frozen=True)
class Chunk:
    start: int  # character offsets into the text: the chunk is text[start:end]
    end: int
    first_token: int  # token positions [first_token, end_token) in the text's tokenization
    end_token: int

    @property
    def n_tokens(self) -> int:
        return self.end_token - self.first_token


def check_chunk_settings(chunk_tokens: int, overlap_tokens: int, max_tokens: int | None = None) -> None:
    if chunk_tokens < 1:
        raise ConfigError(f"--chunk-tokens {chunk_tokens}: expected a positive number of tokens")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ConfigError(f"--overlap-tokens {overlap_tokens}: expected 0 <= overlap < --chunk-tokens ({chunk_tokens})")
    if max_tokens is not None and chunk_tokens > max_tokens:
        raise ConfigError(f"--chunk-tokens {chunk_tokens}: the embedding model reads at most {max_tokens} tokens "
                          "per text, so longer chunks would be cut; use a smaller value")


def token_spans(text: str, tokenizer) -> list[tuple[int, int]]:
    """Character span of every token (a fast tokenizer's offset mapping), zero-width ones left out."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [(s, e) for s, e in enc["offset_mapping"] if e > s]


def boundary_strength(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """For each token: SECTION if a heading starts with it, PARAGRAPH if a blank line precedes it, LINE if a
    line break does, else ANYWHERE. Line and paragraph breaks from a heading through the start of its first
    paragraph count as ANYWHERE, so a heading is not cut off from its text."""
    headings = {m.start() for m in _HEADING.finditer(text)}
    strengths, in_heading = [SECTION], True
    for (_, prev_end), (start, _) in zip(spans, spans[1:]):
        gap = text[prev_end:start]
        line_start = start - len(gap) + gap.rfind("\n") + 1 if "\n" in gap else None
        strength = (SECTION if line_start in headings else PARAGRAPH if gap.count("\n") >= 2
                    else LINE if line_start is not None else ANYWHERE)
        if strength == SECTION:
            in_heading = True
        elif in_heading and strength > ANYWHERE:  # keep a heading with the first paragraph under it
            in_heading = strength < PARAGRAPH
            strength = ANYWHERE
        strengths.append(strength)
    return strengths


def _best_break(strengths: list[int], low: int, high: int, earliest: bool) -> int | None:
    """The strongest boundary token in [low, high); ties go to the earliest or the latest."""
    candidates = range(low, high) if earliest else range(high - 1, low - 1, -1)
    best = None
    for i in candidates:
        if strengths[i] > ANYWHERE and (best is None or strengths[i] > strengths[best]):
            best = i
    return best


def chunk_text(text: str, tokenizer, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               overlap_tokens: int = DEFAULT_OVERLAP_TOKENS) -> list[Chunk]:
    """A window ends before the strongest boundary in its second half (else after `chunk_tokens` tokens). The
    next one starts right there when that is a section heading, else at the strongest boundary within the
    window's last `overlap_tokens` tokens (else exactly `overlap_tokens` back)."""
    check_chunk_settings(chunk_tokens, overlap_tokens)
    spans = token_spans(text, tokenizer)
    strengths = boundary_strength(text, spans)
    chunks, first = [], 0
    while first < len(spans):
        end = first + chunk_tokens
        if end < len(spans):
            cut = _best_break(strengths, first + max(1, chunk_tokens // 2), end + 1, earliest=False)
            end = cut if cut is not None else end
        end = min(end, len(spans))
        chunks.append(Chunk(spans[first][0], spans[end - 1][1], first, end))
        if end == len(spans):
            break
        if strengths[end] == SECTION or not overlap_tokens:
            first = end  # a new section needs no tail of the previous one
            continue
        low = max(end - overlap_tokens, first + 1)
        restart = _best_break(strengths, low, end, earliest=True)
        first = restart if restart is not None else low
    return chunks
