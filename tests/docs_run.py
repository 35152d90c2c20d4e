"""Running a page's blocks in page order in one scratch folder (docs/architecture/writing-docs.md): `tunesmith` lines
in this process on tiny settings (docs_tiny.py), `tunesmith serve ... &` in a thread until the page ends, other
lines in bash, python blocks in this process (a fresh namespace), yaml / json blocks checked (docs_configs.py)."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import docs_configs
from docs_harness import Block, BlockFailed, commands, needs_skip, program, split_command, tunesmith_argv
from docs_tiny import Tiny, rewrite, with_option

LINKED = ("examples", "data")  # the repository's folders every scratch folder holds (as links to each file)
TIMEOUT = 300  # seconds, for one shell command or python block
TAIL = 40  # output lines a failure shows
STDERR_REDIRECT = re.compile(r"\s2>(&1|\S+)")
CURL_CHECKED = re.compile(r"(^|\s)(-w|--write-out|-i|--include|-f|--fail\S*)(\s|$)")


class ThreadOutput(io.TextIOBase):
    """sys.stdout / sys.stderr while a page runs: what a thread writes goes to the buffer it registered (the CLI
    in this thread, a server in its own), else where it went before."""

    def __init__(self, before):
        super().__init__()
        self.before, self.buffers = before, {}

    def write(self, text: str) -> int:
        return self.buffers.get(threading.get_ident(), self.before).write(text)

    def flush(self) -> None:
        self.buffers.get(threading.get_ident(), self.before).flush()

    def isatty(self) -> bool:
        return False


class TooLong(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    """An in-process command or python block that runs past `seconds` is interrupted (SIGALRM; main thread only,
    elsewhere nothing is set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_):
        raise TooLong(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def fail(where: str, problem: str, command: str = "", output: str = "") -> BlockFailed:
    tail = "\n".join(output.rstrip().splitlines()[-TAIL:])
    return BlockFailed(f"{where}: {problem}" + (f"\n  ran: {command}" if command else "")
                       + (f"\n--- output (last {TAIL} lines) ---\n{tail}" if tail else ""))


def free(port: int) -> bool:
    """Whether a server can listen on `port` (as uvicorn binds: SO_REUSEADDR, so closed connections' TIME_WAIT do
    not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tunesmith serve ...` in a thread of this process; uvicorn's server is kept so the page's end can stop it."""

    def __init__(self, run: PageRun, argv: list[str], where: str):
        self.argv, self.where, self.output, self.rc = argv, where, io.StringIO(), None
        self.thread = threading.Thread(target=self._main, args=(run,), name="docs-serve", daemon=True)

    def _main(self, run: PageRun) -> None:
        run.stdout.buffers[threading.get_ident()] = run.stderr.buffers[threading.get_ident()] = self.output
        self.rc = run.call_main(self.argv, self.output)


class PageRun:
    """The blocks of one page, run in order in `scratch`; use as a context manager (the end stops servers and puts
    back the process's output, directory, environment)."""

    def __init__(self, repo: Path, scratch: Path, tiny: Tiny):
        self.repo, self.cwd, self.tiny = repo, scratch, tiny
        self.scratch = scratch
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo / "src"),
                                                                              os.environ.get("PYTHONPATH")])),
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        self.ports: dict[str, str] = {}  # a port the page names -> the free one used instead
        self.servers: list[Server] = []
        self.processes: list[subprocess.Popen] = []
        self.skipped: list[str] = []
        self.seconds: list[tuple[str, float]] = []  # (page:line, seconds) of each command and block run
        for name in LINKED:
            for path in (repo / name).rglob("*"):
                target = scratch / name / path.relative_to(repo / name)
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(path)

    def __enter__(self) -> PageRun:
        import uvicorn

        self.before = (sys.stdout, sys.stderr, sys.stdin, os.getcwd(), dict(os.environ), uvicorn.run)
        self.stdout, self.stderr = ThreadOutput(sys.stdout), ThreadOutput(sys.stderr)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.uvicorn_servers: dict[int, object] = {}
        uvicorn.run = self._uvicorn_run
        return self

    def __exit__(self, *exc) -> None:
        import uvicorn

        try:
            self.stop_servers()
        except BlockFailed:
            if exc[0] is None:  # else the page's own failure is the one to show
                raise
        finally:
            sys.stdout, sys.stderr, sys.stdin, cwd, environ, uvicorn.run = self.before
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environ)

    def run(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.skip:
                self.skipped.append(f"{block.where} ({block.lang}): {block.skip}")
            elif block.lang == "bash":
                self._bash(block)
            elif block.lang != "text":
                start = time.perf_counter()
                getattr(self, f"_{block.lang}")(block)
                self.seconds.append((block.where, time.perf_counter() - start))

    # --- bash ---------------------------------------------------------------------------------------------------
    def _bash(self, block: Block) -> None:
        for command in commands(block):
            start = time.perf_counter()
            self._command(f"{block.page}:{command.line}", self._ports_in(command.text))
            self.seconds.append((f"{block.page}:{command.line}", time.perf_counter() - start))

    def _command(self, where: str, text: str) -> None:
        parsed = split_command(text)
        if parsed.head.split()[:1] in (["tunesmith"], ["python"]) and STDERR_REDIRECT.search(text):
            parsed = split_command(STDERR_REDIRECT.sub("", text))  # in-process, stderr is captured anyway
        try:
            env, words = program(parsed.head)
        except ValueError:
            env, words = {}, []
        why = needs_skip(words)
        if why:
            raise fail(where, f"the suite does not run this ({why}): put <!-- doctest: skip REASON --> on the "
                       "line before the block (and keep the commands it can run in a block of their own)", text)
        argv = tunesmith_argv(words)
        if argv is not None:
            self._tunesmith(where, text, env, argv, parsed)
        elif words[:1] == ["cd"] and not parsed.operator:
            self.cwd = (self.cwd / (words[1] if len(words) > 1 else self.scratch)).resolve()
            if not self.cwd.is_dir():
                raise fail(where, f"no folder {self.cwd}", text)
        elif words[:1] == ["export"] and not parsed.operator:
            exported = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            self.env.update(exported)
            os.environ.update(exported)  # for the in-process commands; put back at the page's end
        elif parsed.background:
            self.processes.append(subprocess.Popen(["bash", "-c", text[:-1]], cwd=self.cwd, env=self.env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            self.shell(where, text)

    def shell(self, where: str, text: str, stdin: str | None = None) -> str:
        if text.startswith("curl ") and not CURL_CHECKED.search(text):
            text = "curl --fail-with-body -sS " + text[len("curl "):]  # an HTTP error fails the block
        try:
            done = subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=self.cwd, env=self.env, input=stdin,
                                  capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise fail(where, f"still running after {TIMEOUT} s", text, str(e.stdout or "")) from None
        if done.returncode:
            raise fail(where, f"exit status {done.returncode}", text, done.stdout + done.stderr)
        return done.stdout

    def _tunesmith(self, where: str, text: str, env: dict, argv: list[str], parsed) -> None:
        os.chdir(self.cwd)
        argv = rewrite(argv, self.tiny)
        shown = "tunesmith " + shlex.join(argv)
        if argv[:1] == ["serve"] and parsed.background:
            self._serve(where, argv)
            return
        if parsed.background or parsed.operator not in ("", "|", ">", ">>"):
            raise fail(where, "one tunesmith command a line, optionally piped (|) or redirected (>): the harness "
                       "runs it in this process; write the rest on lines of their own", text)
        out, err = io.StringIO(), io.StringIO()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.stdout.buffers[threading.get_ident()], self.stderr.buffers[threading.get_ident()] = out, err
        try:
            rc = self.call_main(argv, err)
        finally:
            del self.stdout.buffers[threading.get_ident()], self.stderr.buffers[threading.get_ident()]
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        if rc:
            raise fail(where, f"exit status {rc}", shown, out.getvalue() + err.getvalue())
        if parsed.operator == "|":
            self.shell(where, parsed.rest, out.getvalue())
        elif parsed.operator in (">", ">>"):
            with open(self.cwd / shlex.split(parsed.rest)[0], "a" if parsed.operator == ">>" else "w") as fh:
                fh.write(out.getvalue())

    def call_main(self, argv: list[str], err) -> int:
        """tunesmith.cli.main(argv) with no input on stdin; its exit status (a traceback goes to `err`)."""
        from tunesmith.cli import main

        sys.stdin = io.StringIO("")
        try:
            with deadline(TIMEOUT):
                return main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc(file=err)
            return 1

    # --- servers --------------------------------------------------------------------------------------------------
    def _uvicorn_run(self, app, host: str, port: int, **options) -> None:
        """uvicorn.run while a page runs: the same server, kept so the page's end can stop it."""
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, log_level="warning"))
        self.uvicorn_servers[threading.get_ident()] = server
        server.run()

    def _serve(self, where: str, argv: list[str]) -> None:
        from docs_tiny import parse

        args = parse(argv)
        if args is None:  # the CLI's own message says why
            err = io.StringIO()
            self.stderr.buffers[threading.get_ident()] = err
            try:
                rc = self.call_main(argv, err)
            finally:
                del self.stderr.buffers[threading.get_ident()]
            raise fail(where, f"exit status {rc}", "tunesmith " + shlex.join(argv), err.getvalue())
        if not free(args.port):
            port = free_port()
            self.ports[str(args.port)] = str(port)
            argv = with_option(argv, "--port", port)
            args.port = port
        server = Server(self, argv, where)
        self.servers.append(server)
        server.thread.start()
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if not server.thread.is_alive():
                raise fail(where, f"the server stopped (exit status {server.rc})", "tunesmith " + shlex.join(argv),
                           server.output.getvalue())
            try:
                socket.create_connection((host, args.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise fail(where, f"the server does not listen on port {args.port} after {TIMEOUT} s",
                   "tunesmith " + shlex.join(argv), server.output.getvalue())

    def stop_servers(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait(10)
        for server in self.servers:
            running = self.uvicorn_servers.get(server.thread.ident)
            if running is not None:
                running.should_exit = True
            server.thread.join(30)
        left = [server.where for server in self.servers if server.thread.is_alive()]
        if left:
            raise BlockFailed(f"{', '.join(left)}: the server still runs 30 s after the page's end asked it to stop")

    def _ports_in(self, text: str) -> str:
        for named, used in self.ports.items():
            text = re.sub(rf"(?<=[:=\s]){named}\b", used, text)
        return text

    # --- files ----------------------------------------------------------------------------------------------------
    def _write(self, block: Block, text: str, same) -> Path:
        """The block's text written to its title (relative to the current folder); a title that names a file the
        repository ships (a link in the scratch folder) must show that file as it is, and is not written."""
        path = self.cwd / block.title
        if path.is_symlink():
            if not same(text, path.resolve()):
                raise fail(block.where, f"this block shows {block.title} but differs from the file the repository "
                           "ships; show it as it is, or as an untitled fragment")
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def _yaml(self, block: Block) -> None:
        from tunesmith.errors import TunesmithError

        try:
            if block.title:
                docs_configs.check_whole_config(self._write(block, block.text, docs_configs.same_as_shipped))
            else:
                docs_configs.check_fragment(block.text, self.repo)
        except (TunesmithError, ValueError) as e:
            kind = f"config {block.title}" if block.title else "fragment (merged over the shipped example)"
            raise fail(block.where, f"the {kind} is not valid:\n{e}") from None

    def _json(self, block: Block, lines: bool = False) -> None:
        try:
            docs_configs.check_json(block.text, lines)
        except ValueError as e:
            raise fail(block.where, str(e)) from None
        if block.title:
            self._write(block, block.text, lambda text, path: text.strip() == path.read_text().strip())

    def _jsonl(self, block: Block) -> None:
        self._json(block, lines=True)

    def _python(self, block: Block) -> None:
        """In this process, as `python -` (or `python NAME.py` for a titled block) would run it in the current
        folder: a fresh `__main__` namespace, its output captured, its tracebacks naming the page's own lines. (A
        fresh interpreter would import torch and transformers again for each block: seconds each.)"""
        code = self._ports_in(block.text)
        path = self._write(block, code, lambda text, path: text.strip() == path.read_text().strip()) \
            if block.title else None
        os.chdir(self.cwd)
        out, ident, argv = io.StringIO(), threading.get_ident(), sys.argv
        self.stdout.buffers[ident] = self.stderr.buffers[ident] = out
        sys.argv = [str(path) if path else "-"]
        problem = None
        try:
            with deadline(TIMEOUT):
                exec(compile("\n" * block.line + code, block.page, "exec"),
                     {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__})
        except SystemExit as e:
            if e.code not in (None, 0):
                problem = f"the python block exits with status {e.code}"
        except Exception:
            traceback.print_exc(file=out)
            problem = "the python block raises"
        finally:
            del self.stdout.buffers[ident], self.stderr.buffers[ident]
            sys.argv = argv
        if problem:
            raise fail(block.where, problem, output=out.getvalue())
