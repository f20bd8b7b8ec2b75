"""User mistakes end in one line that names the bad value and the fix, exit code 2, no traceback (the start of
the bad-input catalogue: one table, run in-process through the command-line entry point)."""

import pytest

from distill.cli import main
from distill.teachers import ASSETS

COND = str(ASSETS / "digits_teacher_cond")
CASES = [
    # (name, argv (OUT is replaced by a temporary folder), message)
    ("builtin teacher typo", ["train", "configs/sim_digits.yaml", "teacher.path=builtin:digit", "output_dir=OUT/run"],
     "No builtin teacher 'builtin:digit': the builtin teachers are builtin:digits, builtin:digits-cond"),
    ("output_dir is a file", ["train", "configs/sim_gaussians8.yaml", "output_dir=OUT/afile"],
     "output_dir='OUT/afile' is a file, not a folder"),
    ("class label out of range", ["sample", COND, "--class-labels", "12,3,-1", "--num-images", "4", "--steps", "1",
                                  "--out", "OUT/g.png"],
     "class_labels [-1, 12] are out of range: they must lie in [0, 10] (10 = null class)"),
    ("class labels not integers", ["sample", COND, "--class-labels", "a", "--out", "OUT/g.png"],
     "--class-labels 'a': give integers separated by commas"),
    ("guidance scale on an unconditional model", ["sample", str(ASSETS / "digits_teacher"), "--guidance-scale", "3",
                                                  "--out", "OUT/g.png"],
     "--guidance-scale 3.0: a DDPMPipeline takes no guidance scale (an unconditional or one-step model)"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_gives_one_clear_line(name, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "afile").write_text("not a folder")
    rc = main([a.replace("OUT", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message.replace("OUT", str(tmp_path)) in err and "Traceback" not in err


def test_readme_troubleshooting_messages_are_the_asserted_ones():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"^\| `(.+?)` \|", section, flags=re.M)
    asserted = [m for _, _, m in CASES] + ["'0': give step counts >= 1", "'0' is not a positive integer"]  # test_fid
    assert len(shown) >= 7
    for message in shown:
        assert any(message.replace("...", "OUT/afile") in a or message in a for a in asserted), message
