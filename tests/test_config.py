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
