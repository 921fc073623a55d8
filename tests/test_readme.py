"""The README as a reader uses it: its quickstart runs exactly as written, and its repository layout names
only paths that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.readme


def _block(section: str, lang: str) -> str:
    """The first ```lang code block under the `## section` heading."""
    body = README.split(f"\n## {section}\n", 1)[1]
    match = re.search(rf"```{lang}\n(.*?)```", body, re.S)
    assert match, f"no {lang} block under '## {section}'"
    return match.group(1)


@pytest.mark.timeout(60)
def test_the_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_block("Quickstart", "python"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("moved 49152 bytes of 3 blocks in 12 segments"), proc.stdout
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr


def test_the_layout_section_names_only_paths_that_exist():
    missing = []
    for line in _block("Layout of the repository", "").splitlines():
        if not line or line[0] == " ":
            continue
        first, *rest = line.split("  ")[0].split(", ")
        folder = first.rsplit("/", 1)[0] + "/" if "/" in first.rstrip("/") else ""
        for item in (first, *rest):
            path = item if "/" in item.rstrip("/") or item is first else folder + item
            if not list(ROOT.glob(path.rstrip("/"))):
                missing.append(path)
    assert not missing, f"README's layout names paths that do not exist: {missing}"


def _cited(text: str, name: str) -> bool:
    """Whether docs text cites data file `name`: by its name, or as a numbered series (`x_N.json`, `x_{1,2}.json`)."""
    stem, number = re.fullmatch(r"(.*?)(?:_(\d+))?\.json", name).groups()
    if name in text:
        return True
    return number is not None and (f"{stem}_N.json" in text or any(
        number in m.split(",") for m in re.findall(re.escape(stem) + r"_\{([\d,]+)\}\.json", text)))


def test_docs_data_holds_exactly_the_files_the_benchmarks_cite():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    files = sorted(p.name for p in (ROOT / "docs" / "data").glob("*.json"))
    assert [f for f in files if not _cited(text, f)] == [], "docs/data files no table cites"
    named = set(re.findall(r"\b([a-z0-9_]+\.json)\b", text)) - {"out.json"}
    assert sorted(n for n in named if n not in files and not n.endswith("_N.json")) == []
