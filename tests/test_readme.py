"""The README's front page shows only commands that a test or CI runs, and no link in the docs is
dead (issue 16: a README for newcomers).

Every shell command in a ```bash block of README.md is looked up by its module in RUNS, which
names the test file (or CI script) that runs it. The check is real: that file must contain the
module's invocation and every flag the README command uses (a flag is found when it appears in the
file as a whole word), and a `pip install -e ".[extras]"` must ask for no extra that CI does not
install. So a README command with a new module, or with a flag no test passes, fails here until a
test runs it. The docs/ pages may show more (torchrun on 8 GPUs, say); only the front page is held
to this.

Links: every relative link or image in README.md and docs/*.md must point to a file or folder of
the repository, and a `#anchor` into a markdown page to one of its headings (GitHub's slugs).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_FRONT_PAGE_LINES = 150

# The module a README command runs -> (the file that runs it, the text that shows it runs it there).
RUNS = {
    "pip install": (".ci/run", "pip install"),
    "pytest": (".ci/run", "python -m pytest"),
    "g2g_fast.train": ("tests/test_train_cli.py", '"-m", "g2g_fast.train"'),
    "g2g_fast.translate": ("tests/test_inference.py", '"-m", "g2g_fast.translate"'),
}

SEPARATORS = {"&&", "||", ";", "|", "&"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    &&, ||, ;, | and &; redirections and their targets dropped; leading VAR=value assignments
    dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(?<!\S)\d+(?=[<>])", "", line)  # the 2 of 2>&1: a file descriptor, not an arg
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        argv: list[str] = []
        redirect = False
        for tok in [*lex, "&&"]:
            if tok in SEPARATORS:
                while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
                argv, redirect = [], False
            elif redirect or tok[0] in "<>":
                redirect = tok[0] in "<>"  # the next token is the redirection's target
            else:
                argv.append(tok)
    return commands


def module_of(argv: list[str]) -> tuple[str, list[str]]:
    """-> (what runs: a python module, 'pip install', 'pytest', a script or a program; its args)."""
    prog, args = argv[0], argv[1:]
    if prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            prog, args = args[1], args[2:]
        elif args:
            prog, args = args[0], args[1:]
    if prog in ("pip", "pip3") and args:
        prog, args = f"pip {args[0]}", args[1:]
    return prog, args


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.match(r"--?[A-Za-z]", a)]


def extras(spec: str) -> set[str]:
    m = re.fullmatch(r"\.(?:\[([^\]]*)\])?", spec)
    return {e.strip() for e in (m.group(1) or "").split(",") if e.strip()} if m else set()


def problems(argv: list[str]) -> list[str]:
    """Why a command shown on the front page is not one a test or CI runs ([]: it is)."""
    module, args = module_of(argv)
    if module not in RUNS:
        return [f"nothing in RUNS runs {module!r}: add a test that runs it, and its row to RUNS"]
    where, invocation = RUNS[module]
    text = (ROOT / where).read_text()
    out = []
    if invocation not in text:
        out.append(f"{where} does not contain {invocation!r}")
    for flag in flags_of(args):
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
            out.append(f"{where} never uses the flag {flag} (the README's `{module} ... {flag}`)")
    if module == "pip install" and "-e" in args and args.index("-e") + 1 < len(args):
        wanted = extras(args[args.index("-e") + 1])
        installed = set().union(*(extras(s) for s in re.findall(r"-e\s+[\"']?(\.(?:\[[^\]]*\])?)", text)))
        if wanted - installed:
            out.append(f"{where} installs no extra {sorted(wanted - installed)}")
    return out


FRONT_PAGE = README.read_text()
COMMANDS = [argv for block in bash_blocks(FRONT_PAGE) for argv in shell_commands(block)]


def test_the_front_page_is_short():
    n = len(FRONT_PAGE.splitlines())
    assert n < MAX_FRONT_PAGE_LINES, f"README.md has {n} lines; move the depth into a docs/ page"


def test_the_front_page_shows_the_two_commands_and_translate():
    shown = {module_of(argv)[0] for argv in COMMANDS}
    assert {"pip install", "g2g_fast.train", "pytest", "g2g_fast.translate"} <= shown


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(module_of(a)[:1]) + f"-{i}" for i, a in enumerate(COMMANDS)])
def test_every_front_page_command_is_run_by_a_test_or_ci(argv):
    assert not problems(argv), f"README command `{shlex.join(argv)}`:\n" + "\n".join(problems(argv))


def test_the_check_fails_on_untested_commands():
    """The check above is not vacuous: an unknown flag, module or extra each fail it."""
    translate = "python -m g2g_fast.translate --checkpoint last.pt --content a.png --class b/ --grid g.png"
    assert problems(shell_commands(translate)[0]) == []
    assert any("--frobnicate" in p for p in problems(shell_commands(translate + " --frobnicate 3")[0]))
    assert any("--frob" in p for p in problems(shell_commands(translate + " --frob=3")[0]))
    assert problems(shell_commands("python -m g2g_fast.nonexistent --out x")[0])
    assert problems(shell_commands('pip install -e ".[nonsense]"')[0])
    assert problems(shell_commands('pip install -e ".[dev]"')[0]) == []
    # the shell parsing: continuation lines, &&, comments, env assignments, redirections
    cmds = shell_commands("# a comment\nOMP_NUM_THREADS=1 python -m g2g_fast.train \\\n    --steps 3 "
                          "> log.txt 2>&1 && python -m pytest -q  # the tests\n")
    assert cmds == [["python", "-m", "g2g_fast.train", "--steps", "3"], ["python", "-m", "pytest", "-q"]]


def test_the_front_page_has_one_inference_example():
    """tests/test_inference.py runs the README's python block that calls g2g_fast.load (and skips
    when there is none): there must be exactly one."""
    assert len([b for b in python_blocks(FRONT_PAGE) if "g2g_fast.load(" in b]) == 1


# --- links -------------------------------------------------------------------------------------

PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list[str]:
    text = strip_code(text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    refs = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", text, flags=re.M)
    return inline + refs


def slug_counts(text: str) -> set[str]:
    """GitHub's anchors of a markdown page's headings (lower case, punctuation dropped, spaces to
    hyphens; a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M),
                              flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        s = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return anchors


def dead_links(page: Path) -> list[str]:
    out = []
    for target in links(page.read_text()):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if ROOT not in (dest, *dest.parents) or not dest.exists():
            out.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in slug_counts(dest.read_text()):
            out.append(f"{target}: {dest.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_dead_links(page):
    assert links(page.read_text()) or page != README
    assert not dead_links(page), f"{page.relative_to(ROOT)}:\n" + "\n".join(dead_links(page))


def test_the_link_check_finds_dead_links(tmp_path, monkeypatch):
    assert slug_counts("# A b\n## `python -m x.y` --z\n# A b\n") == {"a-b", "python--m-xy---z", "a-b-1"}
    fake = tmp_path / "page.md"
    fake.write_text("[ok](#a-heading) [gone](nowhere.md) ![img](../x.png) `[code](skipped.md)`\n"
                    "[ref]: also_gone.md\n\n# A heading\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = dead_links(fake)
    assert [d.split(":")[0] for d in found] == ["nowhere.md", "../x.png", "also_gone.md"], found
