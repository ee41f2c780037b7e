"""The docs do not drift from the code: every repository path they quote exists, every relative link
resolves, and every `eflow ...` command they show names real commands and options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from eflow.cli.app import app

ROOT = Path(__file__).parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TOP_LEVEL = ("cli/", "configs/", "docs/", "eflow_core/", "plugins/", "registry/", "scripts/", "tests/")
# a quoted path: starts with a top-level folder of the repository, ends before a space, quote or bracket
_TOPS = "|".join(re.escape(t) for t in TOP_LEVEL)
QUOTED_PATH = re.compile(rf"(?<![\w./-])((?:{_TOPS})[\w./*{{}},-]*\w)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
COMMAND = re.compile(r"(?:^|\$ |&& )(eflow (?:[^`\n|&;#]|\\\n)+)", re.MULTILINE)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _expand(pattern: str) -> list[str]:
    """a/{b,c}.py -> [a/b.py, a/c.py]."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [
        out
        for alt in match.group(1).split(",")
        for out in _expand(pattern[: match.start()] + alt + pattern[match.end() :])
    ]


def _exists(pattern: str) -> bool:
    return any(list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists() for p in _expand(pattern.rstrip(".,")))


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_quoted_repository_path_exists(doc):
    text = doc.read_text()
    missing = sorted({p for p in QUOTED_PATH.findall(text) if not _exists(p)})
    assert not missing, f"{_rel(doc)} quotes paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_resolves(doc):
    links = [
        link for link in LINK.findall(doc.read_text()) if "://" not in link and not link.startswith("mailto:")
    ]
    broken = sorted({link for link in links if not (doc.parent / link).exists()})
    assert not broken, f"{_rel(doc)} links to missing files: {broken}"


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")  # typer's (vendored) click group


def _command_problem(root, words: list[str]) -> str | None:
    """None if `eflow WORDS` names existing (sub)commands and options, else what is wrong."""
    command = root
    ctx = root.context_class(root)
    while _is_group(command) and words and not words[0].startswith("-"):
        if words[0].isupper():  # a placeholder: eflow COMMAND --help
            return None
        sub = command.get_command(ctx, words[0])
        if sub is None and command is not root and "run" in command.list_commands(ctx):
            sub, words = command.get_command(ctx, "run"), ["run", *words]  # eflow eval RUN_DIR = eval run
        if sub is None:
            return f"no command {words[0]!r}"
        command, words = sub, words[1:]
    names = {"--help"} | {
        opt
        for param in command.params
        for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
    }
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and flag not in names:
            return f"no option {flag} for `eflow {command.name}`"
    return None


def _code(text: str) -> str:
    """The text of fenced code blocks and inline code spans, one per line."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    spans = re.findall(
        r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    )
    return "\n".join([*blocks, *spans])


def _commands(text: str) -> list[str]:
    out = []
    for match in COMMAND.finditer(_code(text)):
        line = match.group(1).replace("\\\n", " ").strip()
        if "..." in line or "<" in line:  # a template, not a command
            line = line.split("...")[0].split("<")[0]
        out.append(line)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_shown_eflow_command_exists(doc):
    root = typer.main.get_command(app)
    problems = []
    for line in _commands(doc.read_text()):
        try:
            words = shlex.split(line, comments=True)[1:]
        except ValueError:
            words = line.split()[1:]
        problem = _command_problem(root, words)
        if problem:
            problems.append(f"{line!r}: {problem}")
    assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)


def test_the_command_check_catches_a_wrong_command_and_option():
    root = typer.main.get_command(app)
    assert _command_problem(root, ["sample", "runs/demo", "--steps", "4"]) is None
    assert _command_problem(root, ["eval", "runs/demo", "--num", "8"]) is None  # eval RUN_DIR = eval run
    assert (
        _command_problem(root, ["sample", "runs/demo", "--stepz", "4"])
        == "no option --stepz for `eflow sample`"
    )
    assert _command_problem(root, ["smaple"]) == "no command 'smaple'"
    assert _exists("configs/demo.toml") and not _exists("configs/nope.toml")
