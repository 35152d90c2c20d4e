"""The offline style/domain sets (tunesmith.diffusion.styles) and their scorers (style_scores): each style moves its
statistic, the scorers tell real styled / photo images from the original digits, the reader reads held-out digits in
every look, and a written folder is the captioned-folder layout."""

import json

import pytest
import torch

from tunesmith.diffusion import style_scores, styles
from tunesmith.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorers():
    return style_scores.train_scorers()


@pytest.fixture(scope="module")
def held_out():
    data = styles.digit_split()
    return data["held_out_x"], data["held_out_y"]


def test_split_is_disjoint_and_stratified():
    data = styles.digit_split()
    assert len(data["train_y"]) + len(data["held_out_y"]) == 1797
    for d in range(10):
        n_train, n_held = int((data["train_y"] == d).sum()), int((data["held_out_y"] == d).sum())
        assert abs(n_held / (n_train + n_held) - styles.HELD_OUT) < 0.01
    # photo patches: train from the left 3/4, held out from the right quarter of the same downscaled photo
    photo = styles._photo("temple")
    border = int(photo.shape[2] * styles.PHOTO_TRAIN_COLUMNS)
    held = styles.photo_patches("temple", 20, "held_out")
    right = photo[:, :, border:].unfold(1, 8, 1).unfold(2, 8, 1)  # every 8x8 window of the right quarter
    windows = right.permute(1, 2, 0, 3, 4).reshape(-1, 3, 8, 8)
    assert all(torch.isclose(windows, p).flatten(1).all(1).any() for p in held)


@pytest.mark.parametrize("name,plain,styled", [("inverted", 0.305, 0.695), ("bold", 0.293, 0.609)])
def test_style_moves_its_statistic(name, plain, styled, held_out):
    x, _ = held_out
    images, captions, labels = styles.style_set(name, "held_out")
    statistic = styles.STYLES[name].statistic
    assert statistic(x).mean().item() == pytest.approx(plain, abs=0.02)
    assert statistic(images).mean().item() == pytest.approx(styled, abs=0.02)
    assert captions[0] == f"a drawing of the digit {styles_word(int(labels[0]))} in {name} style"
    assert styles.style_caption(3, name, "before") == f"a {name} drawing of the digit three"


def styles_word(label):
    from tunesmith.diffusion.tiny import WORDS

    return WORDS[label]


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_style_score_and_content_on_real_images(name, scorers, held_out):
    x, y = held_out
    images, _, labels = styles.style_set(name, "held_out")
    assert scorers.style_score(images, name) >= 0.98
    assert scorers.style_score(x, name) <= 0.02
    assert scorers.content_kept(images, labels) >= 0.9
    # the wrong digit is read as wrong
    assert scorers.content_kept(images, (labels + 1) % 10) <= 0.05


def test_reader_reads_held_out_digits(scorers, held_out):
    x, y = held_out
    assert scorers.content_kept(x, y) >= 0.9


def test_domain_scores(scorers, held_out):
    x, _ = held_out
    patches, captions, subjects = styles.domain_set(40, "held_out")
    assert captions[0] == "a photo of a temple" and captions[-1] == "a photo of a flower"
    assert scorers.domain_score(patches) >= 0.95
    assert scorers.domain_score(x) <= 0.02
    assert scorers.subject_kept(patches, subjects) >= 0.85


def test_written_folder_has_a_row_per_image(tmp_path):
    dest = styles.write_style_folder(tmp_path / "bold", "bold", count=12, plain=2)
    rows = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in dest.glob("*.png"))
    assert [r["file_name"] for r in rows] == pngs and len(pngs) == 14
    images, captions, _ = styles.style_set("bold", count=12)
    plain, plain_captions = styles.plain_digits(2)
    images, captions = torch.cat([images, plain]), captions + plain_captions
    assert plain_captions[0].startswith("a drawing of the digit ") and "style" not in plain_captions[0]
    assert [r["text"] for r in rows] == captions
    from tunesmith.diffusion.images import read_pngs

    assert torch.allclose(read_pngs(dest, 3, 8), images, atol=1 / 255)
    readme = (dest / "README.md").read_text()
    assert "bold" in readme and "Mixed in: 2 original digits" in readme
    from tunesmith.diffusion.captions import read_captioned_folder

    assert [r.caption for r in read_captioned_folder(dest)] == captions  # the run's own reader takes it as written
    domain = styles.write_domain_folder(tmp_path / "photos", per_subject=3)
    rows = [json.loads(line) for line in (domain / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a photo of a temple"] * 3 + ["a photo of a flower"] * 3
    assert len(list(domain.glob("*.png"))) == 6


def test_bad_input_names_the_field(scorers):
    with pytest.raises(DataError, match="style: 'italic'"):
        styles.style_set("italic")
    with pytest.raises(DataError, match="words: 'middle'; expected 'after' or 'before'"):
        styles.style_caption(3, "bold", "middle")
    with pytest.raises(DataError, match=r"images: shape \(2, 1, 8, 8\)"):
        scorers.style_score(torch.zeros(2, 1, 8, 8), "bold")
    with pytest.raises(DataError, match="digits: 1 for 2 images"):
        scorers.content_kept(torch.zeros(2, 3, 8, 8), [3])
