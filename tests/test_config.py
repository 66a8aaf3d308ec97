import pytest

from melanoma_siamese.cli import PACKAGED_CONFIGS, config_path
from melanoma_siamese.config import Config, ConfigError, dump_yaml, load_config, with_overrides


def test_packaged_recipes_load_and_differ():
    configs = {name: load_config(config_path(name)) for name in PACKAGED_CONFIGS}
    assert configs["default"].model.backbone == "resnet50" and configs["default"].model.pretrained == "imagenet"
    assert configs["default"].data.image_size == 256
    assert configs["reference"].siamese.mining == "sampled" and configs["reference"].siamese.loss == "triplet"
    assert configs["plain-ce"].siamese.loss == "none" and configs["plain-ce"].classifier.kind == "head"
    assert configs["default"].data.mean == configs["default"].data.std == 0.5


def test_overrides_are_typed():
    config = load_config(None, ["model.backbone=resnet18", "siamese.lr=3e-4", "data.augment.hflip=false",
                                "data.train_melanoma_fraction=0.05"])
    assert config.model.backbone == "resnet18"
    assert config.siamese.lr == pytest.approx(3e-4)
    assert config.data.augment.hflip is False
    assert config.data.train_melanoma_fraction == 0.05


def test_bare_off_and_on_stay_words():
    """YAML 1.1 reads `off`/`on` as booleans; for a text setting they mean the words."""
    config = load_config(None, ["runtime.amp=off", "runtime.channels_last=on"])
    assert config.runtime.amp == "off" and config.runtime.channels_last == "on"


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.backbon=resnet18"])
    assert "model.backbon" in str(err.value) and "model.backbone" in str(err.value)
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(None, ["modle.backbone=x"])


def test_bad_choice_and_type_rejected(tmp_path):
    with pytest.raises(ConfigError, match="semihard"):
        load_config(None, ["siamese.mining=semi-hard"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["data.image_size=big"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("siamese:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_roundtrip_yaml(tmp_path):
    config = with_overrides(Config(), {"siamese.epochs": 7})
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


def test_no_head_variant_differs_from_default_only_in_the_head():
    from melanoma_siamese.config import to_dict

    default, no_head = (to_dict(load_config(config_path(n))) for n in ("default", "default-no-head"))
    assert no_head["siamese"]["ce_weight"] == 0.0 and default["siamese"]["ce_weight"] > 0
    no_head["siamese"]["ce_weight"] = default["siamese"]["ce_weight"]
    assert no_head == default


def test_trust_keys_have_stated_defaults_and_are_checked():
    from melanoma_siamese.calibration import METHODS

    config = load_config(None)
    assert config.evaluation.calibration == "platt" and config.evaluation.prevalence is None
    assert config.evaluation.unfamiliar_k == 5 and config.evaluation.unfamiliar_quantile == 0.99
    assert config.data.min_image_side == 32 and config.data.min_image_std == 2.0
    from melanoma_siamese.config import CHOICES

    assert CHOICES["evaluation.calibration"] == METHODS
    assert load_config(None, ["evaluation.prevalence=0.05"]).evaluation.prevalence == 0.05
    for bad, match in (("evaluation.calibration=isotonic", "platt"), ("evaluation.prevalence=1.5", "prevalence"),
                       ("evaluation.unfamiliar_quantile=1", "unfamiliar_quantile"),
                       ("evaluation.unfamiliar_k=0", "unfamiliar_k"), ("data.min_image_side=0", "min_image_side"),
                       ("evaluation.unfamiliar_quantil=0.9", "valid keys")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


@pytest.mark.parametrize("value", ["timm:", "timm: "])
def test_a_timm_prefix_without_a_name_is_refused_when_the_configuration_loads(value):
    with pytest.raises(ConfigError, match="model.backbone: expected a name"):
        load_config(None, [f"model.backbone={value}"])
    with pytest.raises(ConfigError, match="names no timm model"):
        load_config(None, ["model.backbone='timm: '"])


def test_a_bad_override_is_blamed_on_its_set_not_on_the_file(tmp_path):
    from melanoma_siamese.config import load_config

    packaged = tmp_path / "default.yaml"
    packaged.write_text("siamese:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as found:
        load_config(packaged, ["siamese.lr=0.01", "siamese.epoch=3"])
    assert str(found.value).startswith("--set siamese.epoch=3: unknown configuration key(s) siamese.epoch")
    with pytest.raises(ConfigError, match=r"^--set data.image_size=abc: data.image_size: expected int, got 'abc'"):
        load_config(packaged, ["data.image_size=abc"])
    packaged.write_text("siamese:\n  epoch: 3\n")  # the file's own mistake is still the file's
    with pytest.raises(ConfigError, match=rf"^{packaged}: unknown configuration key\(s\) siamese.epoch"):
        load_config(packaged, ["siamese.lr=0.01"])
