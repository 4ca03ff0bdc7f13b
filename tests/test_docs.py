"""The documentation cannot drift from the code: every shell command shown in README.md and docs/*.md is exercised.

Commands are taken from fenced code blocks (```bash, ```sh, ```shell, ```console and unlabelled blocks; `\\`
continuations joined, `$ ` prompts and comments dropped, output lines skipped) and checked by kind, without running
anything heavy:

- `mmjax ...` / `python -m mmjax ...`: parsed by the real command-line parser with its config file loaded and the
  `--config.KEY=VALUE` overrides applied (`mmjax.cli.parse_command`); config paths are relative to the repository.
- `python -m mmjax.data.bench|synthetic ...`: parsed by those modules' own argument parsers (their `main`, stopped
  right after it has parsed); data.bench's config is loaded as `mmjax bench` loads one.
- `python benchmarks/X.py ...`: the script's own argparse parses the exact flags (in a subprocess, stopped after
  parsing). `python -m pytest ... tests/X.py`: the test files exist.
- `make X`: X is a Makefile target. `[bash] launch/X.sh ...`, `bash benchmarks/X.sh ...`, `sbatch launch/X`:
  the script exists and `bash -n` accepts it; a command that a launcher starts (`launch/local.sh 2 4 mmjax ...`,
  `launch/tpu_pod.sh run NAME ZONE mmjax ...`) is checked in turn.
- `pip`, `git`, `cd`, `export`, `gcloud`, ... (ALLOWED_OTHER): recognised, not run.

Any other command fails, naming the doc file and line, so a new kind of command in the docs needs a check here.
Also: every `mmjax/...py`, `configs/...py`, `tests/...py`, `benchmarks/...` and `launch/...` path the docs name
exists, every dotted `mmjax.x.y` name in backticks resolves, and every relative link resolves.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# Commands that are shown but not exercised (installing, fetching, moving around, cluster tools).
ALLOWED_OTHER = {"pip", "pip3", "git", "cd", "export", "gcloud", "sbatch", "srun", "squeue", "scancel",
                 "tensorboard", "mkdir", "ls", "cat", "tail", "rm", "apt-get", "sudo"}
# Commands whose first word is a script of the repository.
LAUNCHERS_WITH_INNER_COMMAND = {"launch/local.sh": 2, "launch/tpu_pod.sh": 3}  # leading arguments before it


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the command's first line
    text: str  # the joined command line

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _fences(doc: str):
    """Yields (language, [(line number, text), ...]) for every fenced code block of a markdown file."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    fence, lang, body = None, "", []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", stripped)
            if m:
                fence, lang, body = m.group(1), m.group(2).lower(), []
        elif stripped.startswith(fence) and stripped.strip("`~") == "":
            yield lang, body
            fence = None
        else:
            body.append((number, line))
    if fence is not None:
        raise AssertionError(f"{doc}: a code block is not closed")


def _logical_lines(body):
    """Joins `\\` continuations: yields (first line number, joined text)."""
    start, parts = None, []
    for number, line in body:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(p.strip() for p in parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(p.strip() for p in parts)


def _command_word(text: str) -> str:
    """The program a shell line starts (after VAR=value assignments), or ''."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return ""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words[0] if words else ""


def _is_known_kind(word: str) -> bool:
    return (word in {"mmjax", "python", "python3", "make", "bash"} or word in ALLOWED_OTHER
            or word.startswith(("launch/", "benchmarks/", "./launch/")))


def extract_commands(doc: str) -> list[Command]:
    commands = []
    for lang, body in _fences(doc):
        if lang and lang not in SHELL_LANGS:
            continue  # python, json, text, ...: not shell
        for number, text in _logical_lines(body):
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if lang == "console":  # only prompted lines are commands; the rest is output
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            elif stripped.startswith("$ "):
                stripped = stripped[2:]
            if not lang and not _is_known_kind(_command_word(stripped)):
                continue  # an unlabelled block: lines that do not start with a command are output
            commands.append(Command(doc, number, stripped))
    return commands


ALL_COMMANDS = [c for doc in DOCS for c in extract_commands(doc)]


# ----------------------------------------------------------------------------------------------- exercising them

class _Parsed(Exception):
    pass


def _parse_with_main(main, argv):
    """Runs a module's `main(argv)` until its argparse parser has parsed argv; returns the namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
    raise AssertionError("main() returned without parsing its arguments")


def _overrides(argv):
    """The `--config.KEY=VALUE` / `--config.KEY VALUE` arguments of argv, as `mmjax` separates them."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--config."):
            if "=" in argv[i] or i + 1 == len(argv):
                out.append(argv[i])
            else:
                out.extend(argv[i:i + 2])
                i += 1
        i += 1
    return out


def _mmjax(argv):
    from mmjax.cli import parse_command

    args, config = parse_command(argv)
    if getattr(args, "config", None):
        assert config is not None, "the config did not load"


def _python_module(module, argv):
    if module == "mmjax":
        return _mmjax(argv)
    if module == "mmjax.data.bench":
        from mmjax.cli import parse_command
        from mmjax.data import bench

        args = _parse_with_main(bench.main, argv)
        parse_command(["bench", "--config", args.config, *_overrides(argv)])  # its config, as it loads it
        return
    if module == "mmjax.data.synthetic":
        from mmjax.data import synthetic

        _parse_with_main(synthetic.main, argv)
        return
    if module == "pytest":
        paths = [a.split("::")[0] for a in argv if not a.startswith("-")]
        missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
        assert not missing, f"no such test path: {missing}"
        return
    if module.startswith("mmjax.") and not argv:  # e.g. `python -m mmjax.runtime.flops`: the module exists
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        return
    raise AssertionError(f"`python -m {module}` with arguments has no check in tests/test_docs.py")


_PARSE_ONLY = (
    "import argparse, runpy, sys\n"
    "original = argparse.ArgumentParser.parse_args\n"
    "def parse_args(self, args=None, namespace=None):\n"
    "    original(self, args, namespace)\n"
    "    raise SystemExit(0)\n"
    "argparse.ArgumentParser.parse_args = parse_args\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "raise SystemExit('the script finished without parsing its arguments')\n")


def _python_script(script, argv):
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"no such script: {script}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY, path, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} does not accept {argv}:\n{proc.stderr[-2000:]}"


def _shell_script(script):
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"no such script: {script}"
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, f"bash -n {script}:\n{proc.stderr}"


def _make_targets():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", handle.read(), flags=re.M))


def exercise(words):
    """Checks one command line (a list of words); raises AssertionError (or the parser's error) when it is wrong."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value prefixes
    assert words, "an empty command"
    program, argv = words[0], words[1:]
    if program == "mmjax":
        return _mmjax(argv)
    if program in ("python", "python3"):
        if argv[:1] == ["-m"] and len(argv) >= 2:
            return _python_module(argv[1], argv[2:])
        if argv and argv[0].endswith(".py"):
            return _python_script(argv[0], argv[1:])
        raise AssertionError("a `python` command other than `-m MODULE` or `SCRIPT.py` has no check")
    if program == "make":
        targets = [a for a in argv if not a.startswith("-") and "=" not in a]
        missing = sorted(set(targets) - _make_targets())
        assert targets and not missing, f"no such Makefile target: {missing or '(none given)'}"
        return
    if program == "bash" and argv and not argv[0].startswith("-"):
        program, argv = argv[0], argv[1:]
    if program == "sbatch":  # sbatch [OPTIONS] launch/SCRIPT [COMMAND ...]
        scripts = [i for i, a in enumerate(argv) if a.startswith("launch/")]
        assert scripts, "sbatch without a launch/ script"
        _shell_script(argv[scripts[0]])
        if argv[scripts[0] + 1:]:
            exercise(argv[scripts[0] + 1:])  # the command the script starts on every task
        return
    if program.startswith("./"):
        program = program[2:]
    if program.startswith(("launch/", "benchmarks/")) and program.endswith((".sh", ".sbatch")):
        _shell_script(program)
        skip = LAUNCHERS_WITH_INNER_COMMAND.get(program)
        if skip is not None and len(argv) > skip and argv[0] != "stop" and argv[0] != "setup":
            if program == "launch/tpu_pod.sh":
                assert argv[0] == "run", f"launch/tpu_pod.sh {argv[0]!r}: expected setup, run or stop"
            exercise(argv[skip:])  # the command the launcher starts on every process
        return
    if program in ALLOWED_OTHER:
        return
    raise AssertionError(f"`{program}` is not a command kind tests/test_docs.py knows: add a check for it "
                         "(or add it to ALLOWED_OTHER if it is an install or cluster step)")


def test_the_docs_show_commands():
    assert len(ALL_COMMANDS) >= 20, [c.where for c in ALL_COMMANDS]
    assert any(c.doc == "README.md" and shlex.split(c.text, comments=True) == ["make", "test"]
               for c in ALL_COMMANDS), \
        "README.md must show the test command CI runs (`make test`)"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_documented_command(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    try:
        words = shlex.split(command.text, comments=True)
    except ValueError as e:
        pytest.fail(f"{command.where}: cannot split `{command.text}`: {e}")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            exercise(words)
    except SystemExit as e:  # argparse
        pytest.fail(f"{command.where}: `{command.text}` is rejected by its parser (exit {e.code}):\n"
                    f"{stderr.getvalue()}")
    except Exception as e:  # noqa: BLE001 - any failure is reported with where the command is
        pytest.fail(f"{command.where}: `{command.text}`: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------- names and links

def _doc_lines():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
            for number, line in enumerate(handle.read().splitlines(), 1):
                yield doc, number, line


_PATH = re.compile(r"(?<![\w./-])((?:mmjax|configs|tests|benchmarks|launch)/[\w./-]*\w)")


def test_named_paths_exist():
    """Every mmjax/, configs/, tests/, benchmarks/ and launch/ path the docs name exists (`configs/x.py:arg`
    counts as `configs/x.py`)."""
    missing = [f"{doc}:{number}: {path}" for doc, number, line in _doc_lines() for path in _PATH.findall(line)
               if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def _unresolved(name: str) -> str:
    """'' when `name` is a module or an attribute of one, else why not."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - reported with the doc line
            return f"importing {module}: {type(e).__name__}: {e}"
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{module} has no {'.'.join(parts[i:])}"
            obj = getattr(obj, attr)
        return ""
    return "no such module"


def test_named_python_names_resolve():
    """Every dotted `mmjax.x.y` name in backticks is a module or an attribute of one."""
    bad = []
    for doc, number, line in _doc_lines():
        for span in re.findall(r"`[^`]+`", line):
            for name in re.findall(r"\b(mmjax(?:\.[A-Za-z_]\w*)+)", span):
                why = _unresolved(name)
                if why:
                    bad.append(f"{doc}:{number}: {name} ({why})")
    assert not bad, "names in the docs that do not resolve:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: str) -> set[str]:
    anchors, fenced = set(), False
    with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
        for line in handle:
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and line.startswith("#"):
                anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_links_resolve():
    """Every relative markdown link in README.md and docs/*.md names an existing file (and heading, if given)."""
    bad = []
    for doc, number, line in _doc_lines():
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(os.path.join(ROOT, file)):
                bad.append(f"{doc}:{number}: {target} (no file {file})")
            elif anchor and file.endswith(".md") and anchor not in _anchors(file):
                bad.append(f"{doc}:{number}: {target} (no heading #{anchor} in {file})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_no_indented_command_blocks():
    """Commands are shown in fenced blocks (which the test above reads), not as 4-space indented code."""
    bad = []
    for doc in DOCS:
        fenced = False
        with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
            for number, line in enumerate(handle.read().splitlines(), 1):
                if line.lstrip().startswith(("```", "~~~")):
                    fenced = not fenced
                elif not fenced and re.match(r"^ {4,}(\$ )?(mmjax|python3?|make|launch/|bash) ", line):
                    bad.append(f"{doc}:{number}: {line.strip()}")
    assert not bad, "indented (unfenced) commands:\n" + "\n".join(bad)


def test_readme_is_a_front_page():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= 15_000, f"README.md is {size} bytes; keep it a front page (at most 15,000) and link docs/"
