"""Each method's config section validates itself, and every mistake a config alone can make is refused before
any teacher, data or network loads; sections carry only keys that act; building a trainer never writes its
config."""

import copy

import pytest

from distill.cli import main
from distill.config import ConfigError, load_config
from distill.trainers import trainer_class

FAST = ["train.progress_bar=false", "train.report_to=none", "eval.enabled=false",
        "train.checkpointing_steps=1000"]


def test_sid_alpha_with_the_pseudo_huber_distance_is_refused_before_the_teacher_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"sim.sid_alpha=0.5 .*L2 distance.*sim.distance=l2"):
        load_config("configs/sim_gaussians8.yaml", ["sim.sid_alpha=0.5"])
    assert load_config("configs/sim_gaussians8.yaml",
                       ["sim.sid_alpha=0.5", "sim.distance=l2"]).sim.sid_alpha == 0.5
    # a teacher that does not exist: had anything loaded, the error would name the missing folder instead
    code = main(["train", "configs/sim_gaussians8.yaml", "sim.sid_alpha=0.5",
                 f"teacher.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "sim.sid_alpha=0.5" in err and "nowhere" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["distance=l2", "huber_c=0.5", "sid_alpha=1.0"])
def test_uni_instruct_has_no_inherited_keys_that_do_nothing(key):
    """SIM's distance, huber_c and sid_alpha were accepted in the uni_instruct section and ignored."""
    with pytest.raises(ConfigError, match=f"Unknown config key 'uni_instruct.{key.split('=')[0]}'"):
        load_config("configs/uni_instruct_gaussians8.yaml", [f"uni_instruct.{key}"])


def test_student_conditional_is_not_a_key():
    """student.conditional was overwritten from the teacher by every trainer: the student is class-conditional
    exactly when the teacher is."""
    with pytest.raises(ConfigError, match="Unknown config key 'student.conditional'"):
        load_config(None, ["student.conditional=true"])


@pytest.mark.parametrize("case", [
    ("configs/sim_gaussians8.yaml", ["teacher.conditional=true", "sim.init_denoiser_steps=2"]),
    ("configs/progressive_gaussians8.yaml", ["progressive.init_denoiser_steps=2", "progressive.start_steps=4",
                                            "train.max_steps=7"]),
    ("configs/guided_gaussians8.yaml", ["guided.init_denoiser_steps=2", "guided.start_steps=4",
                                        "train.max_steps=7"]),
    ("configs/msd_gaussians8.yaml", ["msd.tsm_steps=2", "msd.num_students=2"]),
    ("configs/teacher_digits_cond.yaml", []),
], ids=["sim", "progressive", "guided", "msd", "teacher"])
def test_building_a_trainer_leaves_its_config_as_given(tmp_path, case):
    config, extra = case
    cfg = load_config(config, FAST + extra + [f"output_dir={tmp_path}"])
    given = copy.deepcopy(cfg.to_dict())
    trainer = trainer_class(cfg.method)(cfg)
    trainer.setup()
    assert cfg.to_dict() == given
    if cfg.method in ("progressive", "guided"):  # the rounds give the run's length; the config keeps its own
        assert trainer.max_steps == sum(n for _, n in trainer.plan) != cfg.train.max_steps


@pytest.mark.parametrize("override, match", [
    ("uni_instruct.ratio_clip=0", "uni_instruct.ratio_clip"),
    ("msd.huber_c=0", "msd.huber_c"),
    ("guided.stage_one_steps=0", "guided.stage_one_steps"),
    ("progressive.start_steps=6", "progressive.start_steps/target_steps"),
    ("mar.width=30", "mar.width/num_heads"),
    ("teacher_train.label_dropout=1.5", "teacher_train.label_dropout"),
    ("train.log_every=0", "train.log_every"),
])
def test_each_section_validates_its_own_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
