import pytest

from pcfm.config import ConfigError, apply_overrides, load_config


def test_overrides_parse_yaml_values_and_reach_nested_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective: mpm\nmax_steps: 10\nmodel:\n  preset: tiny\n")
    config = load_config(path)
    new = apply_overrides(config, ["max_steps=25", "model.width=64", "geometry=[a, b]", "data=null",
                                   "objective_options.mpm.mask_ratio=0.7"])
    assert new == {"objective": "mpm", "max_steps": 25, "model": {"preset": "tiny", "width": 64},
                   "geometry": ["a", "b"], "data": None, "objective_options": {"mpm": {"mask_ratio": 0.7}}}
    assert config["max_steps"] == 10 and "width" not in config["model"]  # the original is untouched


def test_bad_files_and_overrides_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such configuration file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: a configuration must be a mapping"):
        load_config(bad)
    bad.write_text("key: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["max_steps"])
    with pytest.raises(ConfigError, match="'model' is not a mapping"):
        apply_overrides({"model": "tiny"}, ["model.width=3"])
