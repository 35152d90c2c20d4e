"""One YAML loader (config/loading.py) behind the run config and DreamBooth's: a YAML error names file:line, a file
that is not a mapping says what it should hold, pydantic errors name the field, overrides reach nested keys."""

import pytest
from pydantic import BaseModel, ConfigDict

from tunesmith.config import load_config, load_yaml_model
from tunesmith.diffusion.config import load_dreambooth_config
from tunesmith.errors import ConfigError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 1


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: Inner = Inner()


def test_load_yaml_model_reads_overrides_and_names_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  size: 2\n")
    expected = Outer(name="x", inner=Inner(size=5))
    assert load_yaml_model(Outer, path, ["inner.size=5"], sections="name, inner") == expected
    assert load_yaml_model(Outer, None, base={"name": "b"}, sections="name, inner").name == "b"
    with pytest.raises(ConfigError) as e:
        load_yaml_model(Outer, path, ["inner.size=big", "inner.colour=red"], sections="name, inner")
    assert str(e.value).splitlines() == [
        f"{path}: the configuration is not valid:",
        "  - inner.size: Input should be a valid integer, unable to parse string as an integer (got 'big')",
        "  - inner.colour: unknown key (check the spelling; see `tunesmith train --help`)"]
    path.write_text("inner:\n  size: 2\n")
    with pytest.raises(ConfigError, match="  - name: required but missing"):
        load_yaml_model(Outer, path, sections="name, inner")


@pytest.mark.parametrize("load,sections", [(load_config, "model, method, data, ..."),
                                           (load_dreambooth_config, "model, instance, prior, method, train, sample")])
def test_both_loaders_name_the_file_line_and_what_it_should_hold(load, sections, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: a\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: not valid YAML: "):
        load(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=rf"^{path}: expected a mapping of sections \({sections}\), got list$"):
        load(path)
    path.write_bytes(b"model: \xff\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text$"):
        load(path)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'none.yaml'}: config file not found$"):
        load(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"--set 'train': expected key=value"):
        load(None, ["train"], base={})


def test_dreambooth_errors_name_the_field_and_images_resolve_beside_the_file(tmp_path):
    (tmp_path / "pics").mkdir()
    path = tmp_path / "db.yaml"
    path.write_text("instance:\n  images: pics\n  prompt: a photo of sks dog\nprior:\n  weight: 0\n")
    assert load_dreambooth_config(path).instance.images == str(tmp_path / "pics")
    with pytest.raises(ConfigError) as e:
        load_dreambooth_config(path, ["train.steps=0", "method.rank=4"])
    assert str(e.value).splitlines()[1:] == [
        "  - method.rank: unknown key (check the spelling; the keys of method: "
        "docs/reference/config.md#dreambooth-method)",
        "  - train.steps: Input should be greater than 0 (got 0); see docs/reference/config.md#dreambooth-train-steps"]
