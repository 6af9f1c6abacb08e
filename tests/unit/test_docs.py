"""The documentation stays true to the tree: every relative link of README.md and docs/ reaches a
file (and a heading, when it names one), every section a comment cites exists, no file cites
a document outside the repository, the README's Layout lists what exists, and the README stays
a guide (at most 400 lines)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [p for folder in ("pipeline", "stages", "conf", "slurm", "benchmarks", "tests", ".ci")
           for p in sorted((ROOT / folder).rglob("*")) if p.is_file() and p.suffix in (".py", ".yaml", ".sbatch", ".sh", "")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [h.strip() for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)]


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in {slug(h) for h in headings(path)}:
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_cited_sections_exist_and_nothing_outside_the_repository_is_cited():
    problems = []
    for source in SOURCES:
        text = source.read_text(errors="replace")
        where = source.relative_to(ROOT)
        # a project document: docs/<name>.md, or an upper-case name (README.md, RESULTS.md, ...);
        # lower-case names like report.md are files the pipeline writes
        for doc in re.findall(r"(docs/[\w-]+\.md|\b[A-Z][A-Z_]+\.md)\b", text):
            if not (ROOT / doc).exists() and not list(ROOT.glob(f"*/{doc}")):
                problems.append(f"{where}: cites {doc}, which is not in the repository")
        for doc, section in re.findall(r"\b(README|docs/[\w-]+\.md)(?:'s)?,? \"([^\"]+)\"", text):
            path = ROOT / ("README.md" if doc == "README" else doc)
            if not any(h == section or h.startswith(section) for h in headings(path)):
                problems.append(f"{where}: cites {doc} \"{section}\", no such section")
    assert not problems, "\n".join(problems)


def test_the_layout_lists_what_exists():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"(?<![\w/])([\w.]+(?:\.py|/))", layout))
    top = {name for name in listed if name.endswith("/") and not name.startswith(("tasks", "unit", "stages/", "e2e"))}
    missing_dirs = [d for d in ("conf/", "pipeline/", "stages/", "slurm/", "docs/", "tests/", "benchmarks/") if d not in listed]
    assert not missing_dirs, f"the Layout lacks {missing_dirs}"
    modules = {p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"} | {"tasks/"}
    assert not modules - listed, f"pipeline modules missing from the Layout: {sorted(modules - listed)}"
    stale = [name for name in listed if name.endswith(".py") and not (ROOT / "pipeline" / name).exists()
             and not list(ROOT.glob(f"**/{name}"))]
    assert not stale, f"the Layout lists files that do not exist: {stale}"
    assert all((ROOT / d).is_dir() for d in top if d in missing_dirs or d in
               ("conf/", "pipeline/", "stages/", "slurm/", "docs/", "tests/", "benchmarks/"))


def test_the_readme_is_a_guide_of_at_most_400_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 400, f"README.md has {lines} lines; move reference material to docs/"
    quickstart = (ROOT / "README.md").read_text().split("## ", 2)[1]
    assert quickstart.startswith("Quickstart"), "the first section after the pitch is the quickstart"
    assert 'python -m pytest -q -m "not slow"' in quickstart, "the quick test tier is on the first screen"
