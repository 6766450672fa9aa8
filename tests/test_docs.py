"""README.md and docs/*.md: every relative link resolves to a file inside the repository, and every #anchor
to a heading of the page it names (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a link-like text in code is not a link)."""
    lines, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_ids(page: Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2 on repeats."""
    ids: set[str] = set()
    for line in prose_lines(page):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in ids:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        ids.add(candidate)
    return ids


def links(page: Path) -> list[str]:
    found = []
    for line in prose_lines(page):
        without_code = re.sub(r"`[^`]*`", "", line)
        found += [target for target in LINK.findall(without_code) if not target.startswith(EXTERNAL)]
    return found


def test_the_heading_ids_follow_github(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Results of `x`\n## The CPU demo (`python -m agw_light.train`)\n## Re-ranking\n## Re-ranking\n")
    assert heading_ids(page) == {"results-of-x", "the-cpu-demo-python--m-agw_lighttrain", "re-ranking", "re-ranking-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_ids(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == []


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    assert [page.name for page in PAGES[1:] if page not in linked] == []


# A printed command: everything from the first word of the `-m agw_light.<command>` invocation to the end of the line.
COMMAND = re.compile(r"(?:^|&&\s*)((?:\S*python3?|torchrun[^&]*?|srun \S*python3?)\s+-m agw_light\.\w+.*)$")
# Modules that take no Hydra overrides (their arguments are paths).
PLAIN_ARGUMENTS = {"report"}
# Echoes its arguments, NUL-separated: what bash would hand the command, without running it.
ECHO_ARGUMENTS = "args() { printf '%s\\0' \"$@\"; }; "


def printed_commands(page: Path) -> list[str]:
    """The `python -m agw_light...` lines of the page's ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            match = COMMAND.search(line)
            if match:
                commands.append(match[1])
    return commands


def bash_words(command: str, folder: Path) -> list[str]:
    """The words bash passes to the command, got by running it in an empty folder with `args` in the place of the
    program: a redirection, an unclosed quote or a glob that matches would show here."""
    import subprocess

    program, _, arguments = re.split(r"\s+-m\s+", command, maxsplit=1)[1].partition(" ")
    script = ECHO_ARGUMENTS + "args " + program + " " + arguments
    syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, f"{command}: bash -n: {syntax.stderr}"
    run = subprocess.run(["bash", "-c", script], capture_output=True, cwd=folder, timeout=30, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and not run.stderr, f"{command}: {run.stderr.decode()}"
    assert not any(folder.iterdir()), f"{command}: writes {sorted(p.name for p in folder.iterdir())} (a redirection?)"
    return run.stdout.decode().split("\0")[:-1]


def hydra_overrides(module: str, words: list[str]) -> list[str]:
    """The Hydra overrides among a command's words: not its flags (-m, --cfg job), nor search's subcommand."""
    words = words[1:] if module == "search" else words
    return [word for word in words if not word.startswith("-")]


COMMANDS = [(page, command) for page in PAGES for command in printed_commands(page)]


def test_the_printed_commands_are_found():
    assert len(COMMANDS) > 40 and {page.name for page, _ in COMMANDS} >= {"README.md", "deploy.md", "datasets.md"}


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p.name}:{c[:60]}" for p, c in COMMANDS])
def test_every_printed_command_parses_in_bash_and_its_overrides_in_hydra(page, command, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = bash_words(command, tmp_path)
    module = words[0].removeprefix("agw_light.")
    if module not in PLAIN_ARGUMENTS:
        OverridesParser.create().parse_overrides(hydra_overrides(module, words[1:]))


def test_a_camera_pattern_typed_as_printed_reaches_the_parser_whole(tmp_path):
    """The form the docs print for a regular expression: bash keeps the inner quotes, Hydra unquotes them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = bash_words("""python -m agw_light.train "dataset.kwargs.camera_pattern='c(\\d+)'" """, tmp_path)
    (override,) = OverridesParser.create().parse_overrides(words[1:])
    assert (override.key_or_group, override.value()) == ("dataset.kwargs.camera_pattern", r"c(\d+)")
    # The form the docs used to print: bash drops the quotes and Hydra refuses the parentheses.
    unquoted = bash_words("""python -m agw_light.train dataset.kwargs.camera_pattern='c(\\d+)'""", tmp_path)
    with pytest.raises(Exception, match="camera_pattern"):
        OverridesParser.create().parse_overrides(unquoted[1:])


def test_every_test_the_guarantees_name_exists():
    named = re.findall(r"`(test_\w+\.py)::(\w+)`", (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8"))
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(encoding="utf-8"), re.M)
    ]
    assert len(named) > 20 and missing == []
