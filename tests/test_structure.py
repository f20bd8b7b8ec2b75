"""The code's shape as a contract: each method reads alone (no method module imports another method's),
files stay short enough to read in one sitting, and docstrings cite papers, not notes outside the repo."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import distill

ROOT = Path(distill.__file__).parent
METHODS = {"teacher", "sim", "uni_instruct", "progressive", "guided", "multi_student", "mar"}
SHARED = {"score_helpers", "rounds"}  # what two methods compose, and nothing else


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the distill modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(ROOT)
    package = ["distill", *rel.parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_trainer_modules_are_the_methods_and_their_shared_parts():
    names = {p.stem for p in (ROOT / "trainers").glob("*.py")} - {"__init__"}
    assert names == METHODS | SHARED, f"new trainer module(s) {sorted(names - METHODS - SHARED)}: a method " \
                                      "or a part two methods share? Update METHODS / SHARED here."


def test_no_method_imports_another_method():
    bad = []
    for path in sorted((ROOT / "trainers").glob("*.py")):
        if path.stem not in METHODS | SHARED:
            continue
        others = {f"distill.trainers.{m}" for m in METHODS - {path.stem}}
        bad += [f"trainers/{path.name} imports {m}" for m in sorted(_imported_modules(path) & others)]
    assert not bad, "\n".join(bad)


def test_files_stay_readable():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    long = {k: n for k, n in lengths.items() if n > 500}
    assert not long, f"files over 500 lines: {long}"
    assert lengths["engine/loop.py"] <= 450, f"engine/loop.py has {lengths['engine/loop.py']} lines"


def test_docstrings_cite_no_file_outside_the_repository():
    """A path-like citation (``dir/*.md``, ``research/...``, ``DESIGN``, a design note's name) in a docstring
    or comment must name a file of the repository: exported pipeline files travel without our notes."""
    repo = ROOT.parent
    notes = "calibration|ecosystem_api|paper_checks|peers_and_style|score_distillation|step_reduction|" \
            "teacher_families"
    cite = re.compile(rf"[\w.-]+/[\w./-]+\.md\b|\bresearch/[\w./-]+|\bDESIGN\b|\b({notes})\b")
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        prose = [ast.get_docstring(n) or "" for n in ast.walk(ast.parse(text))
                 if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        prose += [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                  if t.type == tokenize.COMMENT]
        for m in cite.finditer("\n".join(prose)):
            name = m.group(0)
            if name == "DESIGN" or "research/" in name or not (repo / name).is_file():
                bad.append(f"{path.relative_to(repo)}: {name}")
    assert not bad, "citations of files outside the repository:\n" + "\n".join(bad)


def test_every_pipeline_file_imports_its_siblings_directly():
    """diffusers copies a remote-code pipeline's DIRECT relative imports into its module cache, not theirs
    (``check_imports`` in dynamic_modules_utils): an exported pipeline file must import every sibling it
    needs transitively, or a fresh Python fails to load it with trust_remote_code."""
    folder = ROOT / "pipelines"

    def direct(name: str) -> set[str]:
        tree = ast.parse((folder / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}

    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        seen, todo = set(), list(direct(path.stem))
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(direct(name))
        assert seen <= direct(path.stem), f"{path.name} needs {sorted(seen - direct(path.stem))} imported"


def test_every_lower_bound_in_setup_cfg_is_the_version_the_lowest_ci_job_installs():
    """setup.cfg's ``>=`` bounds and ci/constraints-lowest.txt (what `make test-lowest` pins, .ci/run runs it)
    name the same versions, so a declared lower bound is one a CI job tests."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(ROOT.parent / "setup.cfg")
    bounds = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        req = Requirement(line.strip())
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if lows:
            bounds[req.name] = Version(lows[0])
    pins = {}
    for line in (ROOT.parent / "ci" / "constraints-lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = Version(version)
    assert {"torch", "diffusers", "transformers", "accelerate", "peft"} <= set(bounds)
    assert bounds == pins
    assert "make test-lowest" in (ROOT.parent / ".ci" / "run").read_text()
