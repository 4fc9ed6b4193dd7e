"""The documentation points at things that exist: every module the data-flow picture names is a
file of the tree, and every link of README.md into docs/ names a file and, where it has one, a
heading of that file (as GitHub derives anchors from headings)."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # GitHub drops punctuation, keeps word characters, - and spaces
    return text.replace(" ", "-")


def test_dataflow_picture_names_real_modules():
    boxes = runpy.run_path(str(ROOT / "docs" / "dataflow.py"))["BOXES"]
    missing = [m for _, _, m, _ in boxes
               if not (ROOT / Path(*m.split("."))).with_suffix(".py").is_file()
               and not (ROOT / Path(*m.split(".")) / "__init__.py").is_file()]
    assert not missing, f"docs/dataflow.py names modules that do not exist: {missing}"
    assert (ROOT / "docs" / "dataflow.png").is_file()


def test_readme_links_into_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert links, "README.md links nothing in docs/"
    broken = []
    for target, anchor in links:
        path = ROOT / target
        if not path.is_file():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}
            if anchor not in anchors:
                broken.append(f"{target}#{anchor}")
    assert not broken, f"README.md links to missing docs or headings: {broken}"


def test_readme_table_of_contents_resolves():
    readme = (ROOT / "README.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    toc = re.findall(r"\]\(#([^)\s]+)\)", readme)
    assert toc and not [a for a in toc if a not in anchors], [a for a in toc if a not in anchors]
