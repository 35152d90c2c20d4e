#!/usr/bin/env python3
"""Build data/pydoc_kb/: the Python FAQ as a RAG knowledge base, plus questions with gold sources and answers.

Source: the reST sources of the Python 3.11 FAQ as shipped by Debian's ``python3.11-doc`` package
(``/usr/share/doc/python3.11-doc/html/_sources/faq/*.rst.txt``; PSF License 2.0).

Outputs (all written atomically, deterministic for a given source):
  docs/faq/<name>.rst     the eight FAQ pages, byte for byte (index.rst, a table of contents, is left out)
  questions.jsonl         one record per FAQ question heading, plus hand-written paraphrases (PARAPHRASES)
                          {"id", "kind", "question", "answer", "gold": [{"source", "section", "start", "end"}]}
  qa_train.jsonl          the heading questions in alpaca format ({"instruction", "output"}), for few-shot
  qa_eval.jsonl           examples and fine-tuning; eval = the N_EVAL sections with the smallest SHA-256 ids

The reference answer is the start of the section's prose (reST markup removed, code blocks and directives
skipped), whole sentences up to at least MIN_ANSWER_WORDS words. Sections whose prose gives fewer than
MIN_ANSWER_WORDS words in all are left out. Usage (needs `apt-get install python3.11-doc`):

    python data/pydoc_kb/build.py [--source /usr/share/doc/python3.11-doc/html/_sources/faq]

Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = Path("/usr/share/doc/python3.11-doc/html/_sources/faq")
PAGES = ("general", "programming", "design", "library", "extending", "windows", "gui", "installed")
MIN_ANSWER_WORDS = 25
N_EVAL = 30
TITLE = re.compile(r"^(?P<title>\S[^\n]*)\n(?P<rule>[-=~^\"'`#*+])(?P=rule){2,}[ \t]*$", re.MULTILINE)
QUESTION_RULE = "-"  # in the FAQ, each question is a title underlined with dashes
LABEL_TAIL = re.compile(r"(?:\n\.\. _[^\n]*:[ \t]*)+\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")

# Questions a user might ask, in other words than the FAQ's heading (heading → paraphrase).
PARAPHRASES = {
    "How can I create a stand-alone binary from a Python script?":
        "How do I turn my program into a single executable that runs without Python installed?",
    "Why am I getting an UnboundLocalError when the variable has a value?":
        "Assigning to a variable inside a function breaks reading the outer variable of that name; why?",
    "Why do lambdas defined in a loop with different values all return the same result?":
        "I build several small anonymous functions in a for loop and every one gives the last value; why?",
    "Why are default values shared between objects?":
        "My function's empty list parameter keeps the items from earlier calls. What is going on?",
    "How do I copy an object in Python?":
        "What is the way to duplicate a value, shallow or deep, so changes do not affect the original?",
    "Is there an equivalent of C's \"?:\" ternary operator?":
        "Can I write a conditional expression that picks one of two values on a single line?",
    "Why does -22 // 10 return -3?":
        "Why does floor division of a negative number round away from zero?",
    "How do I convert a string to a number?":
        "How can I parse text such as '144' into an integer or a float?",
    "What is the most efficient way to concatenate many strings together?":
        "What is the fastest way to join lots of small pieces of text into one string?",
    "How do you remove duplicates from a list?":
        "How can I drop repeated elements from a sequence?",
    "How do I create a multidimensional list?":
        "Why does [[None] * 3] * 2 give rows that change together, and how do I make a proper 2D grid?",
    "My class defines __del__ but it is not called when I delete the object.":
        "Why is my finalizer method not run when I use del on an instance?",
    "How do I create a .pyc file?":
        "When and where is the compiled bytecode cache of a module written?",
    "Why are floating-point calculations so inaccurate?":
        "Why does 1.2 - 1.0 not print exactly 0.2?",
    "Why isn't there a switch or case statement in Python?":
        "How do I choose among many cases without a long chain of if/elif?",
    "How does Python manage memory?":
        "Does CPython use reference counting or a garbage collector to free objects?",
    "Why must dictionary keys be immutable?":
        "Why can't I use a list as a key in a dict?",
    "Why doesn't list.sort() return the sorted list?":
        "Why does sorting a list in place give back None?",
    "How do I make a Python script executable on Unix?":
        "How can I run my .py file directly from the shell like any other command on Linux?",
    "How do I generate random numbers in Python?":
        "Which standard module produces pseudo-random values and shuffles sequences?",
    "What kinds of global value mutation are thread-safe?":
        "Which operations on shared lists and dicts are atomic under the GIL?",
    "How do I send mail from a Python script?":
        "Which standard library module lets a program deliver email through an SMTP server?",
    "Why is it called Python?":
        "Where does the language's name come from?",
    "How do I run a Python program under Windows?":
        "How do I start a script from the Windows command prompt?",
}


def clean_rest(text: str) -> str:
    """reST inline markup → plain words: roles, links, literals and emphasis keep only their text."""
    text = re.sub(r":[\w:-]+:`([^`<]*?)\s*(?:<[^`>]*>)?`", lambda m: m.group(1).lstrip("~!"), text)
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), text)
    text = text.replace("::", ":")
    return " ".join(text.split())


def prose_paragraphs(body: str) -> list[str]:
    """Unindented paragraphs that are not directives, comments or titles."""
    out = []
    for para in re.split(r"\n[ \t]*\n", body):
        if not para.strip() or para[0] in " \t" or para.startswith(".."):
            continue
        if TITLE.match(para.strip()):
            continue
        out.append(clean_rest(para))
    return out


def reference_answer(body: str) -> str:
    words, sentences = 0, []
    for para in prose_paragraphs(body):
        for sentence in SENTENCE_END.split(para):
            sentences.append(sentence)
            words += len(sentence.split())
            if words >= MIN_ANSWER_WORDS:
                return " ".join(sentences)
    return " ".join(sentences) if words >= MIN_ANSWER_WORDS else ""


def sections(page: str, text: str) -> list[dict]:
    """Each question title (dash-underlined) with its span: the title line through the last line before
    the next title of any level (trailing blank lines and `.. _label:` targets left out)."""
    titles = list(TITLE.finditer(text))
    out = []
    for i, m in enumerate(titles):
        if m.group("rule") != QUESTION_RULE:
            continue
        end = titles[i + 1].start() if i + 1 < len(titles) else len(text)
        section = LABEL_TAIL.sub("", text[m.start():end].rstrip())
        heading = " ".join(m.group("title").split())
        out.append({"page": page, "heading": heading, "start": m.start(), "end": m.start() + len(section),
                    "body": text[m.end():m.start() + len(section)]})
    return out


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder holding the FAQ's *.rst.txt")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)
    if not (args.source / "programming.rst.txt").is_file():
        print(f"{args.source}: no FAQ sources there; install them with `apt-get install python3.11-doc`",
              file=sys.stderr)
        return 2

    questions, unanswered = [], []
    for page in PAGES:
        raw = (args.source / f"{page}.rst.txt").read_bytes()
        write_atomic(args.out_dir / "docs" / "faq" / f"{page}.rst", raw)
        for s in sections(page, raw.decode("utf-8")):
            answer = reference_answer(s["body"])
            if not answer:
                unanswered.append(f"{page}: {s['heading']}")
                continue
            gold = {"source": f"faq/{page}.rst", "section": s["heading"], "start": s["start"], "end": s["end"]}
            qid = f"{page}-{hashlib.sha256(s['heading'].encode()).hexdigest()[:10]}"
            questions.append({"id": qid, "kind": "heading", "question": s["heading"], "answer": answer,
                              "gold": [gold]})
    by_heading = {q["question"]: q for q in questions}
    missing = sorted(set(PARAPHRASES) - set(by_heading))
    if missing:
        print(f"paraphrased headings not found (or unanswered): {missing}", file=sys.stderr)
        return 2
    paraphrased = [dict(by_heading[h], id=by_heading[h]["id"] + "-p", kind="paraphrase", question=p)
                   for h, p in PARAPHRASES.items()]
    held_out = set(sorted((q["id"] for q in questions), key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:N_EVAL])
    alpaca = {split: [{"instruction": q["question"], "input": "", "output": q["answer"]} for q in questions
                      if (q["id"] in held_out) == (split == "eval")] for split in ("train", "eval")}
    write_atomic(args.out_dir / "questions.jsonl", jsonl(questions + paraphrased))
    write_atomic(args.out_dir / "qa_train.jsonl", jsonl(alpaca["train"]))
    write_atomic(args.out_dir / "qa_eval.jsonl", jsonl(alpaca["eval"]))
    print(f"{len(PAGES)} FAQ pages; {len(questions)} heading questions with answers, {len(paraphrased)} "
          f"paraphrases; {len(unanswered)} sections without {MIN_ANSWER_WORDS} words of prose left out")
    print(f"qa_train.jsonl: {len(alpaca['train'])}, qa_eval.jsonl: {len(alpaca['eval'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
