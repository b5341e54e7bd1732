"""load_dataset(confine_to=...): a scan that never follows a link out of the given folders (a shared server's)."""

from __future__ import annotations

import os

import pytest

from flux2_lora_core.config import Config
from flux2_lora_core.data import load_dataset, validate_dataset
from flux2_lora_core.errors import ConfigError, PathNotAllowedError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def planted(tmp_path, make_image, write_text):
    """allowed/set: two own images, plus links to an image, a caption and a folder of `outside/`."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    make_image(allowed / "set" / "own_1.png")
    make_image(allowed / "set" / "own_2.png")
    make_image(allowed / "elsewhere_inside.png")
    make_image(outside / "secret_canary.png")
    make_image(outside / "deeper" / "deeper_canary.png")
    write_text(outside / "secret_caption.txt", "a caption from outside")
    (allowed / "set" / "linked_out.png").symlink_to(outside / "secret_canary.png")
    (allowed / "set" / "own_1.txt").symlink_to(outside / "secret_caption.txt")
    (allowed / "set" / "linked_folder").symlink_to(outside / "deeper", target_is_directory=True)
    (allowed / "set" / "linked_inside.png").symlink_to(allowed / "elsewhere_inside.png")
    return allowed, outside


def test_links_leading_out_are_skipped_and_noted_by_their_own_names(planted):
    allowed, outside = planted
    dataset = load_dataset(allowed / "set", confine_to=[allowed])
    assert sorted(dataset.relative_path(i) for i in dataset) == ["linked_inside.png", "own_1.png", "own_2.png"]
    assert next(i for i in dataset if i.image_path.name == "own_1.png").read_caption() == ""  # its caption links out
    notes = {n.path: n.code for n in dataset.notes}
    assert notes == {"linked_folder": "link_outside", "linked_out.png": "link_outside", "own_1.txt": "link_outside"}
    report = validate_dataset(dataset).format_text()
    assert "canary" not in report and "secret" not in report and "deeper" not in report
    assert "linked_out.png" in report  # the link's own name, inside the dataset


def test_without_confinement_links_are_followed_wherever_they_lead(planted):
    allowed, _ = planted
    dataset = load_dataset(allowed / "set")
    assert sorted(dataset.relative_path(i) for i in dataset) == [
        "linked_folder/deeper_canary.png", "linked_inside.png", "linked_out.png", "own_1.png", "own_2.png"]


@pytest.mark.parametrize("where", ["outside", "outside/no_such_folder", "allowed/../outside"])
def test_a_root_outside_is_refused_before_it_is_looked_at(planted, where):
    allowed, _ = planted
    with pytest.raises(PathNotAllowedError, match="outside the folders datasets may be read from") as caught:
        load_dataset(allowed.parent / where, confine_to=[allowed])
    assert "canary" not in str(caught.value) and "not exist" not in str(caught.value)


def test_a_root_that_is_a_link_out_is_refused(planted):
    allowed, outside = planted
    (allowed / "door").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowedError):
        load_dataset(allowed / "door", confine_to=[allowed])
    assert len(load_dataset(allowed / "door", confine_to=[allowed, outside])) == 2


def test_the_config_key_takes_absolute_folders_and_reaches_the_cache(tmp_path):
    config = Config().replace(data={"confine_to": f"{tmp_path}{os.pathsep}~/datasets"})
    assert config.data.confine_to == (str(tmp_path), os.path.expanduser("~/datasets"))
    with pytest.raises(ConfigError, match="data.confine_to"):
        Config().replace(data={"confine_to": ["relative/folder"]})
