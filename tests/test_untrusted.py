"""Untrusted files: distill never unpickles, loads YAML safely, never passes trust_remote_code, and a teacher
folder cannot make it import a module that is not diffusers, transformers or distill."""

import ast
import json
import shutil
from pathlib import Path

import pytest

from distill.config import ConfigError
from distill.teachers import ASSETS, Teacher

PACKAGE = Path(__file__).resolve().parent.parent / "distill"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_pickle_no_unsafe_yaml_no_remote_code_in_the_package():
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [f"{path.name}: import {n}" for n in names
                          if n.split(".")[0] in ("pickle", "dill", "cloudpickle")]
        for node, owner, name in _calls(tree):
            no_pickle = any(kw.arg == "allow_pickle" and isinstance(kw.value, ast.Constant)
                            and kw.value.value is False for kw in node.keywords)
            if (owner, name) in (("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load")) or (
                    (owner, name) == ("np", "load") and not no_pickle):
                found.append(f"{path.name}:{node.lineno} {owner}.{name}")
            for kw in node.keywords:
                if (kw.arg == "trust_remote_code"
                        and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)):
                    found.append(f"{path.name}:{node.lineno} trust_remote_code")
    assert not found, found


def test_a_teacher_folder_cannot_name_a_foreign_module(tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(ASSETS / "digits_teacher", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError,
                       match=r"\['os', 'system'\] is neither a diffusers class nor a distill model"):
        Teacher.from_pretrained(str(folder))
