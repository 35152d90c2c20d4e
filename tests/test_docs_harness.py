"""The doc-test harness itself (tests/docs_harness.py, docs_run.py, docs_configs.py, docs_tiny.py): what it extracts
from a page, what it refuses, how a failure names its page:line, and one page of every kind of block run end to end
(tests/docs_pages/tour.md: a train, a generate on its run, a server with curl and the openai client, a data file and
a config then a train of it, a fragment)."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from docs_harness import BlockFailed, commands, extract, split_command
from docs_run import PageRun, free
from docs_tiny import Tiny, rewrite

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

PAGE = """# A page

<!-- doctest: skip needs a GPU -->
```bash
tunesmith train gpu.yaml
```

~~~yaml title="run.yaml"
output_dir: runs/x
~~~

   ```bash
   tunesmith train run.yaml \\
       --set train.lr=1e-4   # the rate
   # a comment line
   cat > notes.txt <<'EOF'
   a line
   EOF
   ```
"""


def write(tmp_path, text, name="page.md"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_blocks_are_extracted_with_their_line_language_title_and_skip_reason(tmp_path):
    blocks = extract(write(tmp_path, PAGE), "docs/page.md")
    assert [(b.line, b.lang, b.title, b.skip) for b in blocks] == [
        (4, "bash", None, "needs a GPU"), (8, "yaml", "run.yaml", None), (12, "bash", None, None)]
    assert blocks[1].text == "output_dir: runs/x"
    found = commands(blocks[2])
    assert [c.line for c in found] == [13, 16]
    assert found[0].text == "tunesmith train run.yaml --set train.lr=1e-4   # the rate"
    assert found[1].text == "cat > notes.txt <<'EOF'\na line\nEOF"
    assert split_command(found[0].text).head == "tunesmith train run.yaml --set train.lr=1e-4"
    parsed = split_command("tunesmith plan x.yaml --json | jq '.a | .b' &")
    assert (parsed.head, parsed.operator, parsed.rest, parsed.background) == (
        "tunesmith plan x.yaml --json", "|", "jq '.a | .b'", True)


@pytest.mark.parametrize("text, message", [
    ("<!-- doctest: skip -->\n```bash\nls\n```\n", "page.md:1: a skip needs its reason"),
    ("<!-- doctest: skip GPU -->\n\n```bash\nls\n```\n", "page.md:1: a doctest marker goes on the line right before"),
    ("<!-- doctest: run -->\n```bash\nls\n```\n", "page.md:1: unknown doctest marker 'run'"),
    ("text\n```console\n$ ls\n```\n", "page.md:2: language 'console': the conventions cover bash, yaml, python, "
     "json, jsonl, text (use text for output"),
    ("```\nplain\n```\n", "page.md:1: a block without a language"),
    ("```bash\nls\n", "page.md:1: this block is never closed"),
], ids=["reasonless", "misplaced", "unknown-marker", "console", "no-language", "unclosed"])
def test_a_page_the_conventions_do_not_cover_fails_naming_the_line(tmp_path, text, message):
    with pytest.raises(BlockFailed) as e:
        extract(write(tmp_path, text), "page.md")
    assert str(e.value).startswith(message)


def run_blocks(tmp_path, text, tiny=None):
    scratch = tmp_path / "scratch"
    scratch.mkdir(parents=True)
    with PageRun(REPO, scratch, tiny or Tiny(tmp_path / "no-model", tmp_path)) as run:
        run.run(extract(write(tmp_path, text), "docs/p.md"))
    return scratch, run


def test_a_fragment_is_merged_over_the_demo_config_and_an_unknown_key_fails(tmp_path):
    run_blocks(tmp_path, "```yaml\nmethod:\n  name: ia3\ntrain:\n  lr: 3.0e-3\n```\n")  # lora's r/alpha dropped
    with pytest.raises(BlockFailed) as e:
        run_blocks(tmp_path / "b", "\n```yaml\ntrain:\n  lr: 3.0e-3\n  learning_rate: 1\n```\n")
    assert str(e.value).startswith("docs/p.md:2: the fragment (merged over the shipped example) is not valid:")
    assert "train.learning_rate: unknown key" in str(e.value)


def test_a_titled_config_is_written_and_checked_and_a_shipped_one_must_match(tmp_path):
    scratch, _ = run_blocks(tmp_path, '```yaml title="cfg/a.yaml"\ndata:\n  train: t.jsonl\n```\n')
    assert yaml.safe_load((scratch / "cfg" / "a.yaml").read_text()) == {"data": {"train": "t.jsonl"}}
    with pytest.raises(BlockFailed, match="docs/p.md:1: this block shows examples/demo_lora_sft.yaml but differs"):
        run_blocks(tmp_path / "b", '```yaml title="examples/demo_lora_sft.yaml"\ndata:\n  train: t.jsonl\n```\n')
    assert "data:\n  train: data/jargon/train.jsonl" in (REPO / "examples" / "demo_lora_sft.yaml").read_text()


def test_cd_and_export_last_until_the_page_ends(tmp_path):
    import os

    before = os.environ.get("DOCS_HARNESS_PROBE")
    scratch, _ = run_blocks(tmp_path, "```bash\nmkdir -p sub\ncd sub\nexport DOCS_HARNESS_PROBE=7\n```\n\n"
                            "```bash\necho $DOCS_HARNESS_PROBE > seen.txt\n```\n\n```python\nimport os\n"
                            "open('env.txt', 'w').write(os.environ['DOCS_HARNESS_PROBE'])\n```\n")
    assert (scratch / "sub" / "seen.txt").read_text() == "7\n" and (scratch / "sub" / "env.txt").read_text() == "7"
    assert os.environ.get("DOCS_HARNESS_PROBE") == before


def test_a_failing_command_names_page_line_command_and_output(tmp_path):
    text = "```bash\nls examples\n\nls data/missing\n```\n"
    with pytest.raises(BlockFailed) as e:
        run_blocks(tmp_path, text)
    lines = str(e.value).splitlines()
    assert lines[0] == "docs/p.md:4: exit status 2"
    assert lines[1] == "  ran: ls data/missing"
    assert "No such file or directory" in lines[-1]


def test_a_tunesmith_line_may_be_piped_or_redirected(tmp_path):
    scratch, _ = run_blocks(tmp_path, "```bash\ntunesmith --help 2>&1 | grep -c COMMAND > count.txt\n"
                            "tunesmith plan --help >> help.txt\n```\n")
    assert (scratch / "count.txt").read_text() == "2\n"
    assert (scratch / "help.txt").read_text().startswith("usage: tunesmith plan")


def test_a_tunesmith_error_names_page_line_and_the_cli_message(tmp_path):
    with pytest.raises(BlockFailed) as e:
        run_blocks(tmp_path, "```bash\ntunesmith train missing.yaml\n```\n")
    assert str(e.value).startswith("docs/p.md:2: exit status 2\n  ran: tunesmith train missing.yaml")
    assert "missing.yaml" in str(e.value).splitlines()[-1]


@pytest.mark.parametrize("line, needs", [("pip install -e .", "pip: the network"),
                                         ("torchrun --nproc_per_node 2 -m tunesmith train a.yaml", "torchrun"),
                                         ("tunesmith dreambooth --demo", "tunesmith dreambooth --demo")],
                         ids=["pip", "torchrun", "demo"])
def test_a_command_the_suite_cannot_run_needs_a_skip_marker(tmp_path, line, needs):
    with pytest.raises(BlockFailed, match=f"docs/p.md:2: the suite does not run this \\({needs}"):
        run_blocks(tmp_path, f"```bash\n{line}\n```\n")
    _, run = run_blocks(tmp_path / "b", f"<!-- doctest: skip several GPUs -->\n```bash\n{line}\n```\n")
    assert run.skipped == ["docs/p.md:2 (bash): several GPUs"]


def test_a_training_command_gets_the_tiny_settings_after_the_pages_own(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    tiny = Tiny(tmp_path / "tiny", tmp_path)
    argv = rewrite(["train", "examples/demo_lora_sft.yaml", "--set", "train.lr=1e-4"], tiny)
    sets = dict(a.split("=", 1) for a in argv[5:-1:2])
    assert argv[:4] == ["train", "examples/demo_lora_sft.yaml", "--set", "train.lr=1e-4"]
    assert sets["model.path"] == str(tmp_path / "tiny") and sets["train.max_steps"] == "2"
    assert sets["report.forgetting.max_tokens"] == "16" and argv[-1] == "--quiet"
    assert rewrite(["generate", "--adapter", "runs/x", "hi", "--max-new-tokens=64"], tiny) == [
        "generate", "--adapter", "runs/x", "hi", "--max-new-tokens", "2"]  # the adapter's base is kept
    assert rewrite(["generate", "hi"], tiny)[-4:] == ["--model", str(tmp_path / "tiny"), "--max-new-tokens", "2"]


def test_a_page_of_every_kind_of_block_runs(tmp_path, docs_tiny):
    from docs_harness import extract as blocks_of

    page = REPO / "tests" / "docs_pages" / "tour.md"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with PageRun(REPO, scratch, docs_tiny) as run:
        run.run(blocks_of(page, "tests/docs_pages/tour.md"))
        port = int(run.ports.get("8000", 8000))
    assert run.skipped == ["tests/docs_pages/tour.md:6 (bash): the network"]
    trained = yaml.safe_load((scratch / "runs" / "mine" / "config.yaml").read_text())
    assert (trained["method"]["name"], trained["train"]["lr"], trained["train"]["max_steps"]) == ("dora", 1e-4, 2)
    assert trained["model"]["path"] == str(docs_tiny.model)
    assert [w for w, _ in run.seconds][-2:] == ["tests/docs_pages/tour.md:56", "tests/docs_pages/tour.md:59"]
    assert not run.servers[0].thread.is_alive() and free(port)  # the page's end stopped the server


def test_a_python_block_that_runs_too_long_is_stopped_naming_its_line(tmp_path, monkeypatch):
    import docs_run

    monkeypatch.setattr(docs_run, "TIMEOUT", 1)
    with pytest.raises(BlockFailed) as e:
        run_blocks(tmp_path, "```python\nimport time\n\ntime.sleep(30)\n```\n")
    message = str(e.value)
    assert message.startswith("docs/p.md:1: the python block raises")
    assert 'File "docs/p.md", line 4' in message and message.endswith("TooLong: still running after 1 s")
