"""Settings validation: misspelt keywords, bad values, recipes."""

import pytest

from auto_round.config import build_settings


def test_defaults_match_reference():
    s = build_settings()
    assert (s.bits, s.group_size, s.sym, s.iters, s.nsamples, s.seqlen, s.batch_size) == (4, 128, True, 200, 128, 2048, 8)
    assert s.resolved_lr == 1 / 200 and s.resolved_minmax_lr == 1 / 200
    assert build_settings(iters=0).resolved_lr == 5e-3


def test_misspelt_keyword_is_type_error_with_suggestion():
    with pytest.raises(TypeError, match="did you mean 'group_size'"):
        build_settings(groupsize=64)


@pytest.mark.parametrize("kw,match", [({"bits": 9}, "bits=9"), ({"group_size": 0}, "group_size=0"),
                                      ({"iters": -1}, "iters=-1"), ({"scale_dtype": "fp8"}, "scale_dtype"),
                                      ({"lr": -1.0}, "lr=-1.0")])
def test_bad_values_name_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        build_settings(**kw)


def test_recipes():
    assert build_settings("light").iters == 50 and build_settings("light").resolved_lr == 5e-3
    best = build_settings("best")
    assert (best.iters, best.nsamples, best.low_gpu_mem_usage) == (1000, 512, True)
    with pytest.raises(ValueError, match="recipe"):
        build_settings("fastest")


def test_batch_size_above_nsamples_is_clamped_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        s = build_settings(nsamples=4, batch_size=8)
    assert s.batch_size == 4 and "batch_size=8 exceeds nsamples=4" in caplog.text


@pytest.mark.parametrize("kw,match", [({"bits": 4.0}, r"bits=4\.0 \(float\) must be an int"),
                                      ({"bits": "4"}, r"bits='4' \(str\) must be an int"),
                                      ({"sym": "False"}, r"sym='False' \(str\) must be True or False"),
                                      ({"iters": True}, r"iters=True \(bool\) must be an int"),
                                      ({"lr": "0.1"}, r"lr='0.1' \(str\) must be a number"),
                                      ({"dataset": 3}, r"dataset=3 \(int\) must be a string")])
def test_wrong_types_are_refused_naming_the_field(kw, match):
    with pytest.raises(TypeError, match=match):
        build_settings(**kw)


@pytest.mark.parametrize("name", ["lr", "minmax_lr"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_learning_rates_must_be_finite(name, value):
    with pytest.raises(TypeError, match=f"{name}=.* must be finite"):
        build_settings(**{name: value})


def test_numpy_scalars_become_python_scalars():
    import numpy as np

    s = build_settings(bits=np.int64(3), sym=np.bool_(False), lr=np.float32(0.25), device=0)
    assert type(s.bits) is int and s.bits == 3 and s.sym is False and type(s.lr) is float and s.device == 0
