"""Property-based tests (hypothesis): the config parser and its override syntax take any input to a Config
or a ConfigError (never another exception), typed values round-trip, and NoiseSchedule's conversions are
exact inverses at random times for every schedule kind and parameterisation."""

import dataclasses
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.config import Config, ConfigError, field_types, load_config, parse_overrides
from distill.noise import PREDICTION_TYPES, NoiseSchedule

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _keys() -> list[str]:
    """Every dotted key of the config (sections and leaves)."""
    out = []
    for f in dataclasses.fields(Config):
        tp = field_types(Config)[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(tp)]
        else:
            out.append(f.name)
    return out


KEYS = _keys()
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
values = st.one_of(text, st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                   st.sampled_from(["null", "true", "no", "[1, 2]", "{a: 1}", "[", "'", ": :", "1e-3", "-0"]))


@FAST
@given(key=st.one_of(st.sampled_from(KEYS), text), value=values)
def test_any_override_gives_a_config_or_a_config_error(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_several_overrides_never_crash(pairs):
    try:
        load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError:
        pass


@FAST
@given(steps=st.integers(1, 10**9), lr=st.floats(1e-12, 10.0), seed=st.integers(0, 2**31),
       name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=20),
       betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)))
def test_typed_overrides_round_trip_through_yaml(tmp_path_factory, steps, lr, seed, name, betas):
    cfg = load_config(None, [f"train.max_steps={steps}", f"optim.lr={lr!r}", f"train.seed={seed}",
                             f"output_dir=outputs/{name}", f"optim.betas=[{betas[0]!r}, {betas[1]!r}]"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.train.seed) == (steps, lr, seed)
    assert cfg.output_dir == f"outputs/{name}" and cfg.optim.betas == list(betas)
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


@FAST
@given(st.integers(-10**6, 0))
def test_impossible_step_counts_are_refused(n):
    try:
        load_config(None, [f"train.max_steps={n}"])
    except ConfigError as err:
        assert "train.max_steps" in str(err)
    else:
        raise AssertionError("accepted")


@FAST
@given(st.text(max_size=20).filter(lambda s: "=" not in s))
def test_an_override_without_equals_is_refused_with_the_syntax(item):
    try:
        parse_overrides([item])
    except ConfigError as err:
        assert "key.sub=value" in str(err)
    else:
        raise AssertionError("accepted")


SCHEDULES = [NoiseSchedule.vp_from_betas("squaredcos_cap_v2"), NoiseSchedule.vp_from_betas("linear"),
             NoiseSchedule.vp_from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012),
             NoiseSchedule(kind="edm"), NoiseSchedule(kind="flow", prediction_type="flow", shift=3.0)]
times = st.floats(0.02, 0.98)


@FAST
@given(which=st.integers(0, len(SCHEDULES) - 1), t=times, src=st.sampled_from(PREDICTION_TYPES),
       dst=st.sampled_from(PREDICTION_TYPES), seed=st.integers(0, 10**6))
def test_conversions_are_exact_inverses(which, t, src, dst, seed):
    sched = SCHEDULES[which]
    if sched.kind != "vp" and "v_prediction" in (src, dst):
        return  # v is defined for variance-preserving schedules
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen,
                                                                                  dtype=torch.float64)
    tt = torch.full((3,), t, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, tt)
    out = sched.from_x0_eps(x0, eps, tt, src)
    back_x0, back_eps = sched.to_x0_eps(out, x_t, tt, src)
    torch.testing.assert_close(back_x0, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back_eps, eps, rtol=1e-6, atol=1e-6)
    there = sched.convert(out, x_t, tt, src, dst)
    torch.testing.assert_close(sched.convert(there, x_t, tt, dst, src), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(there, sched.from_x0_eps(x0, eps, tt, dst), rtol=1e-6, atol=1e-6)


@FAST
@given(which=st.integers(0, 2), t=st.floats(0.0, 1.0), s=st.floats(0.0, 1.0))
def test_vp_time_is_monotone_and_variance_preserving(which, t, s):
    sched = SCHEDULES[which]
    a, sig = sched.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    assert math.isclose(float(a * a + sig * sig), 1.0, rel_tol=1e-9)
    if t < s:
        assert float(sched.logsnr(t)) >= float(sched.logsnr(s))
    k = sched.timestep(t)
    assert math.isclose(float(sched.t_from_timestep(k.double())), t, abs_tol=1e-6)


@FAST
@given(k=st.integers(0, 999))
def test_training_indices_are_exact_table_entries(k):
    sched = SCHEDULES[0]
    t = sched.t_from_timestep(k)
    a, _ = sched.alpha_sigma(t)
    assert math.isclose(float(a * a), float(sched.alphas_cumprod[k]), rel_tol=1e-9)
