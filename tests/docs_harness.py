"""The doc-test harness (docs/architecture/writing-docs.md): the fenced blocks of a Markdown page, and the commands of
a bash block. PageRun (docs_run.py) runs them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doctest:(?P<rest>.*?)-->\s*$")
ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
LANGUAGES = ("bash", "yaml", "python", "json", "jsonl", "text")
HEREDOC = re.compile(r"(?<!<)<<-?(?!<)\s*(['\"]?)(?P<tag>\w+)\1")
# Programs the suite never runs: a block that uses one carries a skip marker (what each needs).
NEEDS_SKIP = {"make": "runs the suite or the demo", "pip": "the network", "pip3": "the network",
              "git": "the network", "torchrun": "several processes", "ollama": "a program not installed",
              "llama-cli": "a program not installed", "llama-server": "a program not installed",
              "llama-quantize": "a program not installed", "docker": "a program not installed",
              "nvidia-smi": "a GPU", "huggingface-cli": "the network", "hf": "the network", "uv": "the network",
              "sudo": "root", "apt": "root", "apt-get": "root", "accelerate": "several processes"}


class BlockFailed(Exception):
    """A block that does not run as the page says; the message names page:line, the command and its output."""


@dataclass
class Block:
    page: str  # as the test names it (repository-relative)
    line: int  # of the opening fence, from 1
    lang: str
    title: str | None
    text: str
    skip: str | None = None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _fail(page: str, line: int, message: str) -> BlockFailed:
    return BlockFailed(f"{page}:{line}: {message}")


def extract(path: Path, page: str | None = None) -> list[Block]:
    """The fenced blocks of the Markdown file at `path`, in page order. A block of a language the conventions do not
    cover, a marker not on the line right before a block, or a skip without its reason is a BlockFailed."""
    page = page or str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        opening = FENCE.match(lines[i])
        if marker:
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise _fail(page, i + 1, "a doctest marker goes on the line right before the block it is about")
            _skip_reason(marker["rest"], page, i + 1)
        elif opening:
            end = _closing(lines, i, opening)
            if end is None:
                raise _fail(page, i + 1, "this block is never closed")
            info = opening["info"].strip()
            lang = info.split()[0].lower() if info else ""
            if lang not in LANGUAGES:
                shown = f"language {lang!r}" if lang else "a block without a language"
                raise _fail(page, i + 1, f"{shown}: the conventions cover {', '.join(LANGUAGES)} (use text for "
                            "output and anything that is read, bash for commands)")
            indent = len(opening["indent"])
            body = "\n".join(_dedent(line, indent) for line in lines[i + 1:end])
            previous = MARKER.match(lines[i - 1]) if i else None
            skip = _skip_reason(previous["rest"], page, i) if previous else None
            blocks.append(Block(page, i + 1, lang, dict(ATTRIBUTE.findall(info)).get("title"), body, skip))
            i = end
        i += 1
    return blocks


def _skip_reason(rest: str, page: str, line: int) -> str:
    verb, _, reason = rest.strip().partition(" ")
    if verb != "skip":
        raise _fail(page, line, f"unknown doctest marker {rest.strip()!r}; the one marker is "
                    "<!-- doctest: skip REASON -->")
    if not reason.strip():
        raise _fail(page, line, "a skip needs its reason: <!-- doctest: skip REASON --> (GPU, several machines, "
                    "network, a program not installed, minutes)")
    return reason.strip()


def _closing(lines: list[str], start: int, opening: re.Match) -> int | None:
    fence = opening["fence"]
    closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
    return next((j for j in range(start + 1, len(lines)) if closing.match(lines[j])), None)


def _dedent(line: str, indent: int) -> str:
    cut = len(line) - len(line.lstrip(" \t"))
    return line[min(cut, indent):]


@dataclass
class Command:
    line: int  # in the page
    text: str  # continuations joined; a heredoc keeps its body lines


def commands(block: Block) -> list[Command]:
    """The commands of a bash block: a line ending in `\\` continues on the next, `#` comment lines and blank lines
    are dropped, a heredoc (`<<'EOF'` ... `EOF`) stays with its command."""
    lines = block.text.split("\n")
    out, i = [], 0
    while i < len(lines):
        start, text = i, lines[i].rstrip()
        if not text.strip() or text.lstrip().startswith("#"):
            i += 1
            continue
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        heredoc = HEREDOC.search(text)
        if heredoc:
            body = []
            while i + 1 < len(lines):
                i += 1
                body.append(lines[i])
                if lines[i].strip() == heredoc["tag"]:
                    break
            text = "\n".join([text, *body])
        out.append(Command(block.line + 1 + start, text.strip()))
        i += 1
    return out


@dataclass
class Parsed:
    """A command split at its first unquoted shell operator: `head` (the program and its arguments), the operator
    (`|`, `>`, `>>`, `&&`, `;` or `` for none), the rest of the line, and whether it ends in `&` (background)."""
    head: str
    operator: str
    rest: str
    background: bool


def split_command(text: str) -> Parsed:
    body = text.rstrip()
    background = body.endswith("&") and not body.endswith("&&")
    if background:
        body = body[:-1].rstrip()
    quote, i = None, 0
    while i < len(body):
        c = body[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or body[i - 1].isspace()):
            return Parsed(body[:i].rstrip(), "", "", background)
        else:
            for op in (">>", "&&", "||", "|", ">", ";", "<"):
                if body.startswith(op, i):
                    return Parsed(body[:i].rstrip(), op, body[i + len(op):].strip(), background)
        i += 1
    return Parsed(body, "", "", background)


def program(head: str) -> tuple[dict, list[str]]:
    """({VAR: value} set before the program, the program and its arguments) of a command's head."""
    import shlex

    words = shlex.split(head)
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def tunesmith_argv(words: list[str]) -> list[str] | None:
    """The CLI arguments of `tunesmith ...` or `python -m tunesmith ...`, else None."""
    if words[:1] == ["tunesmith"]:
        return words[1:]
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "tunesmith"]:
        return words[3:]
    return None


def needs_skip(words: list[str]) -> str | None:
    """What a command the suite never runs needs (the reason its block must be skipped), else None."""
    name = Path(words[0]).name if words else ""
    if name in NEEDS_SKIP:
        return f"{name}: {NEEDS_SKIP[name]}"
    if name.startswith("python") and words[1:3] in (["-m", "pip"], ["-m", "torch.distributed.run"]):
        return f"{' '.join(words[:3])}: {'the network' if words[2] == 'pip' else 'several processes'}"
    argv = tunesmith_argv(words)
    if argv and argv[0] in ("dreambooth", "text-to-image") and "--demo" in argv:
        return (f"tunesmith {argv[0]} --demo: the builtin tiny-digits model, pretrained on a fresh clone "
                "(minutes)")
    return None
