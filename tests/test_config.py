"""Config tree: built-ins load, overrides apply with types, and every mistake names its key."""

import pytest
import yaml

from ootd.config import Config, ConfigError, builtin_config_names, load_config, save_config, with_overrides


def test_builtins_load_and_differ():
    assert {"default", "tiny"} <= set(builtin_config_names())
    default, tiny = load_config("default"), load_config("tiny")
    assert default.model.backbone == "hf-hub:Marqo/marqo-fashionSigLIP"
    assert tiny.model.backbone == "tiny"
    assert default.model.embed_dim == tiny.model.embed_dim == 128


def test_none_gives_dataclass_defaults():
    assert load_config(None) == Config()


def test_box_jitter_default_is_the_augmentation_modules():
    from ootd.train.augment import BOX_JITTER

    # config.py cannot import the training code, so the default is written twice: this keeps them equal.
    assert Config().train.augment_box_jitter == BOX_JITTER


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("train.lr_head=1e-4", "train", "lr_head", 1e-4),
        ("train.epochs=3", "train", "epochs", 3),
        ("train.lr_backbone=2", "train", "lr_backbone", 2.0),  # int accepted for a float
        ("detect.class_ids=[0]", "detect", "class_ids", (0,)),
        ("detect.class_ids=5", "detect", "class_ids", (5,)),
        ("model.head=mlp", "model", "head", "mlp"),
        ("train.bf16=true", "train", "bf16", True),
        ("store.uri=http://milvus:19530", "store", "uri", "http://milvus:19530"),
        ("serve.api_key=", "serve", "api_key", ""),
    ],
)
def test_overrides_apply_with_types(override, section, key, expected):
    config = load_config("tiny", [override])
    assert getattr(getattr(config, section), key) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("trian.epochs=1", "unknown config key 'trian'"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.epochs=abc", "train.epochs must be an integer"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("model.head=foo", "model.head must be one of"),
        ("train.bf16=maybe", "train.bf16 must be true or false"),
        ("detect.conf=1.5", "detect.conf must be <= 1.0"),
        ("detect.class_ids={a: 1}", "detect.class_ids must be a list"),
        ("epochs=3", "must look like section.key=value"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("default", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: tiny\n  colour: red\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.colour'"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_config_is_frozen():
    config = load_config("tiny")
    with pytest.raises(AttributeError):
        config.train.epochs = 99  # type: ignore[misc]


def test_saved_config_round_trips(tmp_path):
    config = load_config("tiny", ["train.epochs=7", "detect.class_ids=[0, 2]"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == 7
    assert load_config(path) == config
    assert with_overrides(config, ["train.epochs=2"]).train.epochs == 2


def test_yaml_booleans_are_accepted_for_true_false_choices():
    assert load_config("tiny", ["train.use_gpu=false"]).train.use_gpu == "false"
    assert load_config("tiny", ["train.use_gpu=true"]).train.use_gpu == "true"
