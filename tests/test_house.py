"""The package's shape (README "Layout"): imports run one way, the library never imports the
command line, and the trainer names no model family."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "loopdb"


def import_graph() -> dict[str, set[str]]:
    """module -> the loopdb modules it imports, function-local imports included."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        package = parts[:-1]
        name = ".".join(package if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` imports the module x when there is one
                    sub = f"{target}.{alias.name}"
                    is_module = (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() or \
                        (ROOT.parent / sub.replace(".", "/")).is_dir()
                    deps.add(sub if is_module else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d.startswith("loopdb") and d != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(module, stack):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep in graph and dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_command_line():
    offenders = sorted(m for m, deps in import_graph().items()
                       if not m.startswith(("loopdb.cli", "loopdb.__main__")) and any(d.startswith("loopdb.cli") for d in deps))
    assert not offenders


def test_the_trainer_names_no_family():
    source = (ROOT / "training" / "trainer.py").read_text()
    for name in ("family ==", '"stacked"', '"looped"', '"mdm"', '"vit"', '"dit"', "HostOffload", "models."):
        assert name not in source, name


def test_the_command_line_starts_without_torch():
    """`loopdb prepare` and `--help` never pay for importing torch: the command modules import
    what their command runs when it runs."""
    code = "import sys, loopdb.cli; loopdb.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT.parent, env={"PYTHONPATH": str(ROOT.parent), "PATH": ""})
    assert result.stdout.strip() == "False"


MARKDOWN_LINK = r"!?\[[^\]]*\]\(([^)\s]+)\)"


def anchors_of(path: Path) -> set[str]:
    """The anchors a link into a markdown file may name: its explicit ``id="..."`` and GitHub's
    heading slugs (lower case, punctuation dropped, spaces as hyphens; a repeated heading gets -1, -2 ...)."""
    import re

    text = path.read_text()
    anchors, seen = set(re.findall(r'id="([^"]+)"', text)), {}
    inside_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside_code = not inside_code
        elif not inside_code and line.startswith("#"):
            title = re.sub(r"<[^>]+>", "", line.lstrip("#").strip())
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_citation_of_the_method_reference_names_a_section_that_exists():
    import re

    root = Path(__file__).resolve().parent.parent
    anchors = anchors_of(root / "docs" / "method.md")
    cited = {}
    for folder in ("loopdb", "tests", "eval", "docs"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml") and path.is_file():
                for anchor in re.findall(r"method\.md#([\w-]+)", path.read_text()):
                    cited.setdefault(anchor, path.relative_to(root).as_posix())
    for anchor in re.findall(r"method\.md#([\w-]+)", (root / "README.md").read_text()):
        cited.setdefault(anchor, "README.md")
    missing = {anchor: where for anchor, where in cited.items() if anchor not in anchors}
    assert cited and not missing, missing


def test_every_link_of_the_readme_and_docs_resolves():
    """Each relative link (and image) of README.md, docs/, eval/ and data/ names a file that exists, and
    its #anchor a heading or an id of that file (or of the same file)."""
    import re

    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "eval").rglob("*.md")),
             *sorted((root / "data").rglob("*.md"))]
    broken, checked = [], 0
    for page in pages:
        for target in re.findall(MARKDOWN_LINK, page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            checked += 1
            name, _, anchor = target.partition("#")
            linked = (page.parent / name).resolve() if name else page
            where = f"{page.relative_to(root)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                broken.append(f"{where} (no such anchor)")
    assert checked > 20 and not broken, broken
