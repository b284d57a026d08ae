import pytest
import yaml

from saferlhf.config import (
    Config,
    ConfigError,
    build_config,
    describe,
    load_config_file,
    parse_overrides,
    resolve_preset,
    save_config,
)


def test_defaults_then_preset_then_stage_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "optim": {"lr": 0.5, "epochs": 2},
        "stages": {"rm": {"optim": {"lr": 0.25}}, "sft": {"optim": {"epochs": 7}}},
    }))
    rm = build_config("rm", preset, ["optim.micro_batch_size=3"])
    assert (rm.optim.lr, rm.optim.epochs, rm.optim.micro_batch_size) == (0.25, 2, 3)
    assert rm.stage == "rm"
    sft = build_config("sft", preset, ["optim.lr=1e-5"])
    assert (sft.optim.lr, sft.optim.epochs) == (1e-5, 7)
    assert build_config("cm").optim.lr == Config().optim.lr


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("optim.lr=fast", "config key 'optim.lr': expected a number"),
    ("deepspeed.zero_stage=2.5", "config key 'deepspeed.zero_stage': expected an integer"),
    ("run.resume=1", "config key 'run.resume': expected true/false"),
    ("data.train=toy", "config key 'data.train': expected a list"),
    ("optim=3", "config section 'optim': expected a mapping"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("'", "'")):
        build_config("sft", None, [override])


def test_compile_layers_takes_auto_true_or_false_and_refuses_zero_3():
    assert build_config("sft").model.compile_layers == "auto"
    assert build_config("sft", None, ["model.compile_layers=true"]).model.compile_layers is True
    assert build_config("ppo_lag", None, ["model.compile_layers=false"]).model.compile_layers is False
    with pytest.raises(ConfigError, match="'model.compile_layers': expected auto, true or false, got 'fast'"):
        build_config("sft", None, ["model.compile_layers=fast"])
    with pytest.raises(ConfigError, match="compile_layers=true does not work with deepspeed.zero_stage=3"):
        build_config("rm", None, ["model.compile_layers=true", "deepspeed.zero_stage=3"])
    assert build_config("rm", None, ["deepspeed.zero_stage=3"]).model.compile_layers == "auto"  # auto skips it


def test_bad_preset_names_the_key(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  dtyp: float32\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.dtyp'"):
        build_config("sft", preset)
    preset.write_text("stages:\n  nonsense: {}\n")
    with pytest.raises(ConfigError, match="unknown stage"):
        build_config("sft", preset)
    with pytest.raises(ConfigError, match="not found"):
        build_config("sft", tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values():
    tree = parse_overrides(["a.b=3", "a.c=[x, y]", "d=true", "e=1e-3", "f="])
    assert tree == {"a": {"b": 3, "c": ["x", "y"]}, "d": True, "e": "1e-3", "f": ""}


def test_saved_config_round_trips(tmp_path):
    cfg = build_config("cm", None, ["optim.lr=0.125", "data.train=[a, b:0.5]", "deepspeed.zero_stage=3"])
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config_file(tmp_path / "config.yaml")
    assert back == cfg


def test_shipped_presets_resolve_for_every_stage_they_name():
    for name in ("tiny-cpu", "smollm2-cpu", "llama-7b-8xgpu"):
        path = resolve_preset(name)
        stages = yaml.safe_load(path.read_text()).get("stages", {})
        assert stages, name
        for stage in stages:
            build_config(stage, path)  # raises on any unknown key or wrong type


def test_describe_lists_every_leaf_with_default():
    lines = describe(Config())
    assert any(line.strip().startswith("optim.lr = 2e-05") for line in lines)
    assert any(line.strip().startswith("run.out_dir = ''") for line in lines)
