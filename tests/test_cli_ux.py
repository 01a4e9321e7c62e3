"""The CLI's user experience: recipes, grouped help, reference aliases, ``list``, ``--dry-run``."""

import json

import pytest

from auto_round.cli import GROUPS, NEGATED_FLAGS, SETTING_GROUP, build_parser, main, main_best, main_light, main_mllm, \
    requested_recipe
from auto_round.config import RECIPES, Settings


def _defaults(recipe):
    ns = build_parser("auto-round", recipe).parse_args(["--model", "m"])
    return {k: getattr(ns, k) for k in ("iters", "nsamples", "lr", "low_gpu_mem_usage", "disable_opt_rtn")}


def test_recipes_hold_the_reference_values():
    assert RECIPES["best"] == {"iters": 1000, "nsamples": 512, "low_gpu_mem_usage": True}
    assert RECIPES["light"] == {"iters": 50, "lr": 5e-3}
    assert RECIPES["rtn"] == {"iters": 0, "disable_opt_rtn": True}
    assert RECIPES["opt-rtn"] == {"iters": 0}
    assert _defaults("default") == {"iters": 200, "nsamples": 128, "lr": None, "low_gpu_mem_usage": False,
                                    "disable_opt_rtn": False}
    assert _defaults("rtn")["iters"] == 0 and _defaults("rtn")["disable_opt_rtn"] is True
    assert _defaults("opt-rtn")["iters"] == 0 and _defaults("opt-rtn")["disable_opt_rtn"] is False


def test_recipe_flag_sets_defaults_and_explicit_options_win():
    argv = ["--model", "m", "--recipe", "best", "--nsamples", "7"]
    recipe = requested_recipe(argv, "default")
    ns = build_parser("auto-round", recipe).parse_args(argv)
    assert (recipe, ns.iters, ns.nsamples, ns.low_gpu_mem_usage) == ("best", 1000, 7, True)
    assert requested_recipe(["--recipe=light"], "default") == "light"
    assert requested_recipe([], "best") == "best"  # auto-round-best's own default
    with pytest.raises(SystemExit, match="--recipe 'fast' is unknown; use one of default, best, light, rtn, opt-rtn"):
        requested_recipe(["--recipe", "fast"], "default")


def test_best_and_light_entry_points_are_their_recipes(model_dir, tmp_path, capsys):
    for entry, recipe in ((main_best, "best"), (main_light, "light")):
        assert entry(["--model", str(model_dir), "--group_size", "32", "--seqlen", "32", "--dry-run",
                      "--output_dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"recipe    {recipe}: " in out and f"iters {RECIPES[recipe]['iters']}," in out


def test_rtn_recipe_quantizes_without_data_and_reports_it(model_dir, tmp_path, capsys, monkeypatch):
    from auto_round import AutoRound

    def no_data(self):
        raise AssertionError("round-to-nearest must not read calibration data")

    monkeypatch.setattr(AutoRound, "calibration_batches", no_data)
    assert main(["--model", str(model_dir), "--recipe", "rtn", "--group_size", "32", "--output_dir", str(tmp_path)]) == 0
    folder = tmp_path / f"{model_dir.name}-w4g32"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["iters"] == 0
    report = json.loads((folder / "quantization_report.json").read_text())
    assert report["settings"]["disable_opt_rtn"] is True and report["data"]["samples"] is None
    assert "quantized 14 linear layers, 1 kept in full precision" in capsys.readouterr().out


def test_help_is_grouped_and_every_flag_says_what_it_does():
    p = build_parser("auto-round")
    titles = [g.title for g in p._action_groups]
    assert all(t in titles for t in GROUPS.values())
    group_of = {a.dest: g.title for g in p._action_groups for a in g._group_actions}
    for name, key in SETTING_GROUP.items():
        if name in {f.name for f in Settings.__dataclass_fields__.values()}:
            assert group_of[name] == GROUPS[key], name
    for key, dest in (("model", "model"), ("export", "format"), ("evaluation", "tasks"), ("run", "dry_run"),
                      ("tuning", "recipe"), ("device", "device"), ("data", "dataset")):
        assert group_of[dest] == GROUPS[key]
    for a in p._actions:
        if a.help is not None and a.help != "==SUPPRESS==":
            assert len(a.help) > 15, (a.option_strings, a.help)
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    assert actions["--asym"].help.startswith("asymmetric") and actions["--disable_amp"].help.startswith("tune in float32")
    assert all(actions[flag].dest == name for name, flag in NEGATED_FLAGS.items())
    mllm = {a.dest: g.title for g in build_parser("auto-round-mllm", extra_settings=_mllm_fields())._action_groups
            for a in g._group_actions}
    assert mllm["quant_nontext_module"] == mllm["template"] == GROUPS["multimodal"]


def _mllm_fields():
    from auto_round.mllm.autoround_mllm import MLLM_SETTINGS

    return MLLM_SETTINGS


def test_reference_spellings_are_accepted():
    ns = build_parser("auto-round").parse_args(
        ["--model_name", "m", "--iter", "5", "--nsample", "3", "--seq_len", "16", "--train_bs", "2", "--dtype", "int",
         "--devices", "cpu", "--formats", "fake", "--asym", "--disable_minmax_tuning", "--dry_run", "--task", "ppl:x"])
    assert (ns.model, ns.iters, ns.nsamples, ns.seqlen, ns.batch_size, ns.data_type, ns.device, ns.format) == \
        ("m", 5, 3, 16, 2, "int", "cpu", "fake")
    assert ns.sym is False and ns.enable_minmax_tuning is False and ns.dry_run and ns.tasks == "ppl:x"


@pytest.mark.parametrize("what", ["formats", "families", "datasets", "recipes", "backends"])
def test_list_prints_what_the_registries_hold(what, capsys):
    from auto_round.calib.text import OFFLINE_CORPUS
    from auto_round.export import available_formats
    from auto_round.inference.backends import list_backends
    from auto_round.mllm.families import FAMILIES

    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    expected = {"formats": available_formats(), "families": [f.name for f in FAMILIES], "recipes": list(RECIPES),
                "backends": list_backends(), "datasets": [OFFLINE_CORPUS]}[what]
    rows = {line.split()[0] for line in out.splitlines()[2:]}
    assert set(expected) <= rows, (expected, out)


def test_list_shows_a_newly_registered_format_with_its_capabilities(capsys, monkeypatch):
    from auto_round.export import registry

    class Only8(registry.Exporter):
        """Writes nothing (a test format)."""

        def check_layer(self, name, out_features, in_features, bits, group_size, sym):
            return None if bits == 8 and sym else "8-bit sym only"

        def save(self, *a, **k):
            raise NotImplementedError

    registry.available_formats()
    monkeypatch.setitem(registry._FORMATS, "test_only8", Only8())
    assert main(["list", "formats"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test_only8"))
    assert "bits 8; groups 32,64,128,-1" in row and "Writes nothing" in row and " - " in row


def test_list_of_something_unknown_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "models"])
    assert e.value.code == 2 and "invalid choice: 'models'" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_reads_writes_and_tunes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from auto_round import AutoRound, autoround

    def forbidden(*a, **k):
        raise AssertionError("a dry run must not read data or tune")

    monkeypatch.setattr(AutoRound, "calibration_batches", forbidden)
    monkeypatch.setattr(autoround, "quantize_model", forbidden)
    out_dir = tmp_path / "out"
    (tmp_path / "held_out.txt").write_text("some text to score")
    argv = ["--model", str(model_dir), "--group_size", "32", "--seqlen", "64", "--format", "auto_round,gguf:q4_0",
            "--output_dir", str(out_dir), "--dry-run", "--tasks", f"ppl:{tmp_path / 'held_out.txt'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("family text LLM", "block list model.layers: 2 blocks", "14 linear layers quantized, 1 kept",
                 "model.layers.[0-1].mlp.down_proj", "64x128  W4 g32 sym", "lm_head", "FP (outside the tuned blocks)",
                 "format    auto_round: ok", "format    gguf:q4_0: ok", "memory    model", "GFLOP/s measured",
                 "128 samples x 64 tokens, batch 8 (not read", "held_out.txt on the saved checkpoint: ok"):
        assert text in out, text
    assert not out_dir.exists()


def test_dry_run_says_which_format_or_task_cannot_run(model_dir, tmp_path, capsys):
    argv = ["--model", str(model_dir), "--group_size", "32", "--seqlen", "64", "--asym", "--format",
            "auto_round,auto_gptq", "--output_dir", str(tmp_path / "o"), "--dry-run", "--tasks", "ppl:missing.txt"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "format    auto_round: ok" in out and "format    auto_gptq: FAILS: " in out
    assert "ppl:missing.txt on the saved checkpoint: FAILS: task ppl:missing.txt: no such file" in out
    assert "W4 g32 asym" in out and not (tmp_path / "o").exists()


def test_dry_run_of_a_vlm_names_the_family_and_the_fp_vision_tower(tmp_path, capsys):
    from tiny_vlms import FAMILIES

    vlm = FAMILIES["qwen2_vl"]()
    vlm.model.save_pretrained(tmp_path / "vlm")
    vlm.processor.save_pretrained(tmp_path / "vlm")
    assert main_mllm(["--model", str(tmp_path / "vlm"), "--group_size", "32", "--dry-run", "--output_dir",
                      str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "family qwen2_vl" in out and "FP (vision tower (quant_nontext_module=False))" in out
    assert not (tmp_path / "o").exists()
