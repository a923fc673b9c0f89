"""Every citation of the method document in the code resolves inside the repository (core/README.md)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "core" / "README.md"
CODE = [p for folder in ("core", "utils", "tools", "tests") for p in sorted((REPO / folder).rglob("*.py"))] + \
    [REPO / s for s in ("main.py", "cut_patches.py", "train_3Dmodel.py")]

NUMBER = r"\d+(?:\.\d+)*(?!\d)(?!\.\d)"
# "SPEC 8.1 step 3, 8.2, 12.2", "SPEC 4.2-4.3", "SPEC section 3", "SPEC sections 6-8"
SECTION_REF = re.compile(rf"SPEC\s+(?:sections?\s+)?({NUMBER}(?:\s*-\s*{NUMBER})?(?:\s+step\s+\d+)?"
                         rf"(?:,\s*{NUMBER}(?:\s*-\s*{NUMBER})?(?:\s+step\s+\d+)?)*)(?!\s*#)")
DECISION_REF = re.compile(r"(?:SPEC\s+11\s+#|KEEP\s+#|FIX\s+#)(\d+)")
APPENDIX_REF = re.compile(r"(?:SPEC\s+App\.|Appendix)\s+([A-D])")


def _headings() -> set[str]:
    found = set()
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"#+\s+({NUMBER})\.?\s", line)
        if m:
            found.add(m.group(1))
        m = re.match(r"#+\s+Appendix ([A-Z])\.", line)
        if m:
            found.add(f"App. {m.group(1)}")
    return found


def _decisions() -> set[int]:
    return {int(m.group(1)) for m in re.finditer(r"^\|\s*(\d+)\s*\|", DOC.read_text(encoding="utf-8"), re.M)}


def citations() -> list[tuple[str, str]]:
    """(file:line, cited key) for every section, decision and appendix citation in the code."""
    out = []
    for path in CODE:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            for m in SECTION_REF.finditer(line):
                text = re.sub(r"\s+step\s+\d+", "", m.group(1))
                out += [(where, key) for key in re.findall(NUMBER, text)]
            out += [(where, f"#{m.group(1)}") for m in DECISION_REF.finditer(line)]
            out += [(where, f"App. {m.group(1)}") for m in APPENDIX_REF.finditer(line)]
    return out


def test_every_citation_resolves():
    headings, decisions = _headings(), _decisions()
    cited = citations()
    assert len(cited) > 150                               # the code cites the document throughout
    missing = [f"{where}: {key}" for where, key in cited
               if not (key in headings or (key.startswith("#") and int(key[1:]) in decisions))]
    assert not missing, "citations without a section in core/README.md:\n" + "\n".join(missing)


def test_the_document_has_every_decision_and_module():
    assert _decisions() == set(range(1, 38))
    text = DOC.read_text(encoding="utf-8")
    modules = sorted(p.name for p in (REPO / "core").glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"core/{m}" not in text] == []
