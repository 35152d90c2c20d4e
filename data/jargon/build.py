#!/usr/bin/env python3
"""Build data/jargon/{train,eval}.jsonl from the Jargon File (public domain).

Source: Debian's ``dict-jargon`` package (The Jargon File 4.4.7, 29 Dec 2003),
installed with ``apt-get install dict-jargon``.  It is a dictd database:

* ``/usr/share/dictd/jargon.index``: ``headword<TAB>offset<TAB>length`` lines,
  offset and length written in dictd's base64 digits;
* ``/usr/share/dictd/jargon.dict.dz``: the entries' text, dictzip-compressed
  (gzip-compatible, so :mod:`gzip` reads it).

Each entry becomes one alpaca-format record::

    {"instruction": "What does \\"<term>\\" mean in hacker jargon?",
     "input": "", "output": "<first 1-2 sentences of the definition>"}

The build is deterministic: the same source gives byte-identical output.
Usage::

    python data/jargon/build.py [--dict-dir /usr/share/dictd] [--out-dir data/jargon]

Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DICT_DIR = Path("/usr/share/dictd")

SEED = 0
N_EVAL = 100
N_TRAIN = 1200  # cap (keeps the file small); later shuffled records are unused
MAX_HEADWORD_CHARS = 32  # longer headwords are proverbs/sayings, not terms
MIN_OUTPUT_CHARS = 110  # with the ~45-char prompt: >= ~40 tokens at 4 chars/token
MAX_OUTPUT_CHARS = 300  # ~75 tokens; cut only at sentence boundaries
INSTRUCTION = 'What does "{term}" mean in hacker jargon?'

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
B64_VALUE = {c: i for i, c in enumerate(B64)}


# --------------------------------------------------------------------------
# Reading the dictd database


def b64_decode_number(s: str) -> int:
    """dictd index numbers: big-endian base-64 digits, no padding."""
    n = 0
    for c in s:
        n = n * 64 + B64_VALUE[c]
    return n


def read_entries(dict_dir: Path) -> list[tuple[str, str]]:
    """Return ``(index_headword, raw_entry_text)`` pairs in index order."""
    index_path = dict_dir / "jargon.index"
    dict_path = dict_dir / "jargon.dict.dz"
    if not dict_path.exists():  # uncompressed variant
        dict_path = dict_dir / "jargon.dict"
    if not index_path.exists() or not dict_path.exists():
        sys.exit(
            f"error: dict-jargon database not found in {dict_dir}\n"
            "install it with: apt-get update && apt-get install -y dict-jargon"
        )
    opener = gzip.open if dict_path.suffix == ".dz" else open
    with opener(dict_path, "rb") as f:
        blob = f.read()
    entries = []
    with open(index_path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            head, off, length = line.split("\t")
            start = b64_decode_number(off)
            text = blob[start : start + b64_decode_number(length)].decode("utf-8")
            entries.append((head, text))
    return entries


# --------------------------------------------------------------------------
# Cleaning

# Words that may make up a sentence that only points at another entry
# ("See {foo}.", "Syn. for {foo}, sense 2.", "Yet another synonym for {foo}.").
REDIRECT_WORDS = {
    "see", "also", "syn", "synonym", "synonyms", "for", "with", "of", "same",
    "as", "var", "sp", "variant", "plural", "equivalent", "to", "yet",
    "another", "less", "more", "common", "and", "or", "compare", "oppose",
    "q", "v", "sense", "senses", "the", "a", "an", "under", "entry",
    "entries", "those", "this", "that", "it", "in", "commonwealth", "hackish",
    "shorter", "ruder", "n", "vt", "vi", "adj",
}
# Line-wrap damage and typos in the source text, fixed literally.
SOURCE_FIXES = (
    ("[nt] roff", "[nt]roff"),  # "[nt]\nroff"
    ("in ASCII Consensus", "in ASCII. Consensus"),  # microLenat
    ("wedged,unusable", "wedged, unusable"),  # brick
    ("smaller client system.", "smaller client system)."),  # download
    ("and rn(1))", "and rn(1)"),  # Perl
)
TABLE_CHARS = re.compile("[\u2500-\u257f\u25a1]")  # box drawing => table/figure
PRONUNCIATION_PAREN = re.compile(r"\s*\(/[^()]*?/\)")  # "(/ad-hos'@-tee/)"
# bare pronunciations in running text: "/pyoob' d@\u00b7rek't@\u00b7ree/", "/K\u00b4rad\u00b4/"
PRONUNCIATION = re.compile(r"(\w+\s+)?/[^/]{0,40}[@`\u00b4\u00b7][^/]{0,40}/")
LEADING_ALT = re.compile(r"^\(alt\.?:?[^()]*\)\s*")  # "(alt.: barfucious, /.../)"
LEADING_SENSE = re.compile(r"^1[.,]\s+")  # "1, [from FUD]" is a typo for "1."
LEADING_PRONUNCIATION = re.compile(r"^/[^/]*/,?\s*")  # "1. /kluhj/ n. ..."
LEADING_POS = re.compile(
    r"^(?:n|v|vt|vi|adj|adv|interj|excl|prov|obs|pl\.n)\.\s*(?=[A-Za-z(\[{])"
)
TRAILING_XREF = re.compile(r"\s*\((?:see|compare)\b[^()]*\)\.?$", re.IGNORECASE)
BRACES = re.compile(r"\{\s*([^{}]*?)\s*\}")


def strip_bracket_note(s: str) -> str:
    """Remove a leading ``[...]`` etymology/usage note ("[Usenet; common]").

    Nesting-aware ("[acronym for '[paper] Tape Editor']").  Returns '' when
    the text is only a note.
    """
    if not s.startswith("["):
        return s
    depth = 0
    for i, c in enumerate(s):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return s[i + 1 :].lstrip()
    # unbalanced in the source: '[abbreviation, "...") A programming language'
    # or '[portmanteau of \u2018spam\u2019 and \u2018forgery\u2019. Massive floods ...'
    m = re.match(r"\[[^\[\]]*?[)\u2019\u201d]\.?\s+(?=[A-Z])", s)
    return s[m.end() :] if m else s


def strip_leading_notes(para: str) -> str:
    """Drop sense number, notes, alternates and part of speech before the text."""
    para = LEADING_SENSE.sub("", para)
    while True:  # they stack: "[IRC] (alt.: ...) n. ..."
        before = para
        para = strip_bracket_note(para)
        para = LEADING_ALT.sub("", para)
        para = LEADING_PRONUNCIATION.sub("", para)
        para = LEADING_POS.sub("", para)
        m = re.match(r"(\([^()]*\))\s+(?=\[)", para)  # "(also GOF) [prob. ...]"
        if m:
            para = f"{m.group(1)} {strip_bracket_note(para[m.end():])}"
        if para == before:
            return para


def split_entry(text: str) -> tuple[str, list[str]]:
    """Return (display headword, body paragraphs with line breaks unwrapped).

    An entry is: the headword line, then header lines (pronunciation and part
    of speech, e.g. `` /ak/, interj.``) up to the first blank line, then the
    body, paragraphs separated by blank lines, indented by four spaces.
    """
    text = text.replace("\u00ad", "")  # soft hyphens inside words
    lines = text.split("\n")
    head = lines[0].strip()
    i = 1
    while i < len(lines) and lines[i].strip():
        i += 1
    body = "\n".join(lines[i:])
    paras = []
    for para in re.split(r"\n[ \t]*\n", body):
        para = " ".join(para.replace("\u00a0", " ").split())
        if para:
            paras.append(para)
    return head, paras


def tidy(s: str) -> str:
    """Fix spacing left by unwrapping (cross-reference braces are kept)."""
    s = PRONUNCIATION_PAREN.sub("", s)
    s = re.sub(r"(https?|ftp):// +", r"\1://", s)
    s = BRACES.sub(r"{\1}", s)  # "{ crudware}" -> "{crudware}"
    # the source wraps lines right after opening quotes / before closing ones
    s = re.sub("([\u201c\u2018(]) +", r"\1", s)
    s = re.sub(" +([\u201d\u2019)])", r"\1", s)
    s = re.sub(r"(?<=\S) +([.,;:!?])(?=[\s\"\u201d\u2019)]|$)", r"\1", s)
    s = re.sub(r"\} -(?=[a-z])", "}-", s)  # "{spam}\n-emitting"
    s = s.replace("^ -", "^-")  # "10^\n-18"
    for typo, fix in SOURCE_FIXES:
        s = s.replace(typo, fix)
    return " ".join(s.split())


def finish(s: str) -> str:
    """Drop cross-reference braces; typographic quotes and dashes -> ASCII.

    Other non-ASCII characters (accented letters, Greek, ...) are kept.
    """
    s = BRACES.sub(r"\1", s)  # "{foo}" -> "foo"
    s = s.replace("\u201c", '"').replace("\u201d", '"')
    s = s.replace("\u2018", "'").replace("\u2019", "'")
    s = s.replace("\u2014", "--").replace("\u2212", "-")
    return " ".join(s.split())


# Tokens before a period that do not end a sentence.
ABBREVIATIONS = {
    "e.g.", "i.e.", "esp.", "cf.", "vs.", "viz.", "abbrev.", "syn.", "var.",
    "sp.", "obs.", "poss.", "prob.", "approx.", "orig.", "alt.", "pron.",
    "n.", "v.", "vt.", "vi.", "adj.", "adv.", "dr.", "mr.", "mrs.", "ms.",
    "st.", "jr.", "sr.", "no.", "vol.", "ed.", "pp.", "p.", "inc.", "corp.",
    "ltd.", "co.", "dept.", "univ.", "ca.", "fig.", "ver.", "u.s.", "u.k.",
    "mt.", "gen.", "lt.", "col.", "sgt.", "capt.", "rev.", "prof.",
}
SENTENCE_END = re.compile(
    r"[.!?][\"'\u201d\u2019)\]]*(?=\s+(?:\[|[\"'\u201c\u2018(]?[A-Z0-9$/<]))"
)


def sentences(text: str) -> list[str]:
    """Split on ., ! or ? followed by a capitalised word.

    Not after abbreviations or initials, and not inside a double-quoted
    passage (the source's curly quotes tell opening from closing) or an
    open parenthesis.
    """
    out, start = [], 0
    for m in SENTENCE_END.finditer(text):
        end = m.end()
        chunk = text[start:end]
        if chunk.count("\u201c") > chunk.count("\u201d"):
            continue  # inside a quotation: "You're gonking me. Stop it."
        if chunk.count("(") > chunk.count(")"):
            continue  # inside a parenthesis spanning sentences
        word = text[start : m.start() + 1].split()[-1]
        word = word.lstrip("\"'([\u201c\u2018").lower()
        if text[m.start()] == "." and (
            word in ABBREVIATIONS
            or re.fullmatch(r"[a-z]\.", word)  # initials: "Wile E. Coyote"
            or re.fullmatch(r"(?:[a-z]\.){2,}", word) and word != "q.v."
            or word.endswith("..")  # ellipsis mid-sentence
        ):
            continue
        out.append(text[start:end].strip())
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def is_redirect(sentence: str) -> bool:
    """True for a sentence that only points elsewhere ("See {foo}.")."""
    s = re.sub(r"\{[^{}]*\}", " ", sentence)
    s = re.sub(r"\(?\bsenses? \d+(?:\s*(?:and|or|,)\s*\d+)*\)?", " ", s)
    words = re.findall(r"[a-z]+", s.lower())
    return not words or all(w in REDIRECT_WORDS for w in words)


def definition(paras: list[str]) -> tuple[str | None, str]:
    """Return (cleaned short definition, '') or (None, reason for skipping)."""
    for para in paras:
        para = strip_leading_notes(para)
        if para:
            break  # else the paragraph was only an etymology/usage note
    else:
        return None, "empty"
    if TABLE_CHARS.search(para):
        return None, "table"
    raw = [strip_bracket_note(s) for s in sentences(tidy(para))]
    raw = [s for s in raw if s]
    if not raw:
        return None, "empty"
    if is_redirect(raw[0]):
        return None, "redirect"
    parts = [finish(s) for s in raw]
    out = parts[0]
    if out.endswith(":"):
        return None, "introduces a list or example"
    if len(out) > MAX_OUTPUT_CHARS:
        return None, "first sentence too long"
    if len(parts) > 1 and not is_redirect(raw[1]) and not parts[1].endswith(":"):
        both = f"{out} {parts[1]}"
        if len(both) <= MAX_OUTPUT_CHARS:
            out = both
    m = PRONUNCIATION.search(out)
    while m:
        if m.group(1) and m.group(1).strip() == "pronounced":
            return None, "pronunciation in text"
        out = out[: m.start()] + (m.group(1) or "").rstrip() + out[m.end() :]
        m = PRONUNCIATION.search(out)
    out = " ".join(out.replace(" )", ")").replace(" ,", ",").split())
    out = TRAILING_XREF.sub("", out)  # '... BAZ." (See also fum)'
    if re.match(r"[a-z]+\b(?![(.])", out):  # "fortuitous typo for ..."
        out = out[0].upper() + out[1:]
    if len(out) < MIN_OUTPUT_CHARS:
        return None, "too short"
    if out[-1] not in ".!?\"')":
        out += "."
    return out, ""


def display_term(head: str) -> str:
    """Undo the index's inversions: "line eater, the" -> "the line eater"."""
    m = re.fullmatch(r"([^,]+), ((?:[a-z]|X )[^,]*)", head)
    if m and head[-1] not in ".!?":
        return f"{m.group(2)} {m.group(1)}"
    return head


def build_records(entries: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    records, seen_terms, seen_outputs = [], set(), set()
    for index_head, text in entries:
        if index_head.startswith("00-database-"):
            skip("dictd metadata")
            continue
        head, paras = split_entry(text)
        head = display_term(head)
        if not head.isascii():
            skip("non-ASCII headword")
            continue
        if len(head) > MAX_HEADWORD_CHARS:
            skip("long headword")
            continue
        out, reason = definition(paras)
        if out is None:
            skip(reason)
            continue
        key = head.lower()
        if key in seen_terms or out in seen_outputs:
            skip("duplicate")
            continue
        seen_terms.add(key)
        seen_outputs.add(out)
        records.append(
            {"instruction": INSTRUCTION.format(term=head), "input": "", "output": out}
        )
    return records, skipped


# --------------------------------------------------------------------------
# Output


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dict-dir", type=Path, default=DEFAULT_DICT_DIR)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)

    entries = read_entries(args.dict_dir)
    records, skipped = build_records(entries)
    # Records are built in index order (sorted headwords); shuffle with a
    # private RNG so the split does not depend on global state.
    random.Random(SEED).shuffle(records)
    eval_recs = records[:N_EVAL]
    train_recs = records[N_EVAL : N_EVAL + N_TRAIN]
    unused = len(records) - len(eval_recs) - len(train_recs)

    write_jsonl_atomic(args.out_dir / "train.jsonl", train_recs)
    write_jsonl_atomic(args.out_dir / "eval.jsonl", eval_recs)
    print(f"source entries: {len(entries)}")
    for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  skipped ({reason}): {n}")
    print(f"records: {len(records)} ({unused} unused beyond the train cap)")
    print(f"wrote {len(train_recs)} records to {args.out_dir / 'train.jsonl'}")
    print(f"wrote {len(eval_recs)} records to {args.out_dir / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
