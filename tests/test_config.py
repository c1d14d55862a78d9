"""Config: one dataclass, flags generated from its fields, presets < file < flags, checkpoint round trip."""
import argparse
import dataclasses
import json

import pytest

from config import PRESETS, Config, add_config_args, config_from_args, config_from_dict, config_to_dict, make_config
from utils import UserError


def parse(argv):
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    return config_from_args(ap.parse_args(argv))


def test_every_field_has_a_flag():
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    flags = {a.dest for a in ap._actions}
    assert {f.name for f in dataclasses.fields(Config)} <= flags


def test_defaults_are_the_paper_setup():
    c = Config()
    assert (c.image_model, c.text_model, c.image_size, c.embed_dim, c.batch_size, c.epochs) == \
        ("resnet50", "distilbert-base-uncased", 224, 256, 16, 50)
    assert (c.lr_image, c.lr_text) == (1e-4, 1e-5)


def test_flags_override_preset_and_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "batch_size": 8}))
    c = parse(["--preset", "offline", "--config", str(f), "--batch-size", "4", "--freeze-text", "false",
               "--image-model", "vit_base_patch16_224"])
    assert c.image_size == PRESETS["offline"]["image_size"]   # from the preset
    assert c.epochs == 7                                        # file beats preset
    assert c.batch_size == 4 and c.freeze_text is False         # flags beat both
    assert c.image_model == "vit_base_patch16_224"


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nimage_model: resnet18\n")
    assert parse(["--config", str(f)]).image_model == "resnet18"


def test_bare_bool_flag_means_true():
    assert parse(["--freeze-image"]).freeze_image is True


def test_unknown_field_and_preset_are_one_line_errors(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(UserError, match="epochz"):
        parse(["--config", str(f)])
    with pytest.raises(UserError, match="unknown preset"):
        make_config(preset="nope")
    for bad in ("1", "-0.5"):
        with pytest.raises(UserError, match=r"--ema-decay .* must be in \[0, 1\)"):
            parse(["--ema-decay", bad])
    assert parse(["--ema-decay", "0.999"]).ema_decay == 0.999


def test_checkpoint_dict_round_trip_ignores_unknown_keys():
    c = make_config(dict(epochs=3), preset="tiny")
    d = config_to_dict(c) | {"from_the_future": 1}
    assert config_from_dict(d) == c


def test_every_flag_has_help_text():
    from config import field_comments
    helps = field_comments()
    assert {f.name for f in dataclasses.fields(Config)} <= set(helps)
    assert "bf16" in helps["amp"] and "GradCache" in helps["accum_steps"]     # continuation lines are joined


@pytest.mark.parametrize("field, value, rule", [
    ("epochs", 0, ">= 1"), ("accum_steps", 0, ">= 1"), ("num_workers", -1, ">= 0"), ("lr_image", -1e-4, ">= 0"),
    ("warmup_steps", -5, ">= 0"), ("val_fraction", 1.0, "in [0, 1)"), ("max_length", 0, ">= 1"),
    ("source_side", -48, ">= 0"), ("seed", -1, "in [0, 2**32 - 1]"), ("seed", 2**32, "in [0, 2**32 - 1]")])
def test_numbers_no_run_can_use_are_refused_in_one_line_naming_the_flag(field, value, rule):
    with pytest.raises(UserError) as e:
        make_config({field: value})
    msg = str(e.value)
    assert msg == f"--{field.replace('_', '-')} {value} must be {rule}" or msg.startswith(
        f"--{field.replace('_', '-')} {value} must be {rule} (")
    make_config({field: {"epochs": 1, "accum_steps": 1, "max_length": 1, "val_fraction": 0.0}.get(field, 0)})  # edge ok


def test_several_bad_numbers_are_named_together():
    with pytest.raises(UserError, match=r"^--lr-text -1.0 must be >= 0; --grad-clip -2.0 must be >= 0$"):
        make_config(dict(lr_text=-1.0, grad_clip=-2.0))


@pytest.mark.parametrize("name, text, kind", [("c.yaml", "key: [1", "YAML"), ("c.json", "{bad", "JSON")])
def test_a_config_file_that_does_not_parse_is_one_line(tmp_path, name, text, kind):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=rf"c\.{name[2:]}: not valid {kind} \(") as e:
        make_config(config_file=str(tmp_path / name))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["resume", "init_from"])
def test_resume_and_init_from_in_a_config_file_are_refused_pointing_at_the_flag(tmp_path, key):
    f = tmp_path / "res.yaml"
    f.write_text(f"{key}: R/last.pth\nlr_image: 0.5\n")
    with pytest.raises(UserError, match=rf"res\.yaml: {key} is not a config-file key; pass --{key.replace('_', '-')} "
                                        "on the command line"):
        parse(["--config", str(f)])


def test_yaml_null_means_off_and_a_list_of_classes_becomes_a_comma_list(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("final_path:\ncaption_bank:\nexclude_classes: [happy, sad]\n")
    c = parse(["--config", str(f)])
    assert (c.final_path, c.caption_bank, c.exclude_classes) == ("", "", "happy,sad")


@pytest.mark.parametrize("text, key", [
    ('{"epochs": "two"}', "epochs"), ('{"epochs": NaN}', "epochs"), ('{"epochs": Infinity}', "epochs"),
    ('{"epochs": [1, 2]}', "epochs"), ('{"epochs": null}', "epochs"), ('{"augment": "maybe"}', "augment"),
    ('{"augment": 2}', "augment"), ('{"epochs": 1.7}', "epochs"), ('{"image_size": 48.9}', "image_size"),
    ('{"max_steps": -0.5}', "max_steps"), ('{"image_model": {"name": "resnet18"}}', "image_model"),
    ('{"image_model": null}', "image_model"), ('{"lr_image": "fast"}', "lr_image")])
def test_a_wrong_type_in_a_config_file_is_one_line_naming_key_value_and_type(tmp_path, text, key):
    f = tmp_path / "c.json"
    f.write_text(text)
    with pytest.raises(UserError, match=rf"^config {key}: .* is not (a whole number|a number|true or false|text)"):
        parse(["--config", str(f)])


def test_integral_floats_and_bool_words_in_a_file_are_taken(tmp_path):
    f = tmp_path / "C.YAML"                                   # upper-case suffix: still YAML
    f.write_text("epochs: 3.0\naugment: 'no'\ncache_images: 0\nlr_head: 2e-3\n")
    c = parse(["--config", str(f)])
    assert (c.epochs, c.augment, c.cache_images, c.lr_head) == (3, False, False, 2e-3)
    assert isinstance(c.epochs, int)


@pytest.mark.parametrize("argv, msg", [
    (["--lr-image", "inf"], "--lr-image inf must be a finite number"),
    (["--lr-image", "1e308"], "--lr-image 1e+308 must be <= 10"),
    (["--weight-decay", "inf"], "--weight-decay inf must be a finite number"),
    (["--ema-decay", "nan"], "--ema-decay nan must be a finite number"),
    (["--source-side", "1"], "--source-side 1 must be 0 (off) or >= 16 px"),
    (["--text-weights", "Pretrained"], "invalid choice"),
    (["--preset", "tiny", "--text-weights", "pretrained"], "--text-width 64 builds a random-init text tower"),
    (["--image-weights", ""], "--image-weights '': give hub, none")])
def test_infinite_or_odd_values_are_refused_in_one_line(argv, msg, capsys):
    with pytest.raises((UserError, SystemExit)) as e:
        parse(argv)
    said = str(e.value) if e.type is UserError else capsys.readouterr().err
    assert msg in said


def test_a_new_runs_data_folder_is_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse(["--data", "sub"]).data == str(tmp_path.resolve() / "sub")
