"""Text-to-image data and training helpers: captioned folders, aspect buckets, caption dropout, EMA, min-SNR."""

import json
import math

import numpy as np
import pytest
import torch

from tunesmith.diffusion.buckets import BucketBatchSampler, assign_buckets, load_image, make_buckets, nearest_bucket, prepare
from tunesmith.diffusion.captions import drop_captions, read_captioned_folder
from tunesmith.diffusion.ema import EMA
from tunesmith.diffusion.snr import min_snr_weights
from tunesmith.errors import ConfigError, DataError, ModelError


def image(path, size=(8, 8), value=None):
    """A grey PNG of size (w, h); pixel (y, x) = x unless a constant value is given."""
    from PIL import Image

    w, h = size
    a = np.full((h, w), value, np.uint8) if value is not None else np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)
    return path


def rows(folder, recs):
    return [(r.path.relative_to(folder).as_posix(), r.caption, r.size) for r in recs]


def read(folder, **kw):
    warnings = []
    return read_captioned_folder(folder, warn=warnings.append, **kw), warnings


# ---------------------------------------------------------------- captions


def test_metadata_jsonl_with_subfolders_and_caption_column(tmp_path):
    image(tmp_path / "b.png", (8, 4))
    image(tmp_path / "sub" / "a.png", (4, 8))
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/a.png", "text": " a tall one ", "prompt": "p-a"}) + "\n\n"
        + json.dumps({"file_name": "b.png", "text": "a wide one", "prompt": "p-b"}) + "\n")
    recs, warnings = read(tmp_path)
    assert rows(tmp_path, recs) == [("b.png", "a wide one", (8, 4)), ("sub/a.png", "a tall one", (4, 8))]
    assert warnings == []
    recs, _ = read(tmp_path, caption_column="prompt")
    assert [r.caption for r in recs] == ["p-b", "p-a"]


def test_csv_table_in_a_subfolder_and_a_named_column(tmp_path):
    image(tmp_path / "x" / "c.png")
    image(tmp_path / "x" / "d.png")
    (tmp_path / "x" / "captions.csv").write_text('file_name,caption\nd.png,"two\nlines"\nc.png,plain\n')
    recs, _ = read(tmp_path, caption_column="caption")
    assert rows(tmp_path, recs) == [("x/c.png", "plain", (8, 8)), ("x/d.png", "two\nlines", (8, 8))]
    with pytest.raises(DataError, match=r"captions\.csv:1: the header has no 'text' column \(it has: file_name, caption\)"):
        read(tmp_path)
    (tmp_path / "x" / "captions.csv").write_text("\ufefffile_name,text\nc.png,plain\nd.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"captions\.csv:3: no value in the 'text' column"):
        read(tmp_path)


def test_txt_beside_each_image_first_line_and_mixed_sources(tmp_path):
    image(tmp_path / "one.png")
    image(tmp_path / "deep" / "two.jpg")
    image(tmp_path / "three.png")
    (tmp_path / "one.txt").write_text("\n  first line  \nsecond line\n")
    (tmp_path / "deep" / "two.txt").write_text("two")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "three.png", "text": "from the table"}) + "\n")
    recs, warnings = read(tmp_path)
    assert rows(tmp_path, recs) == [("deep/two.jpg", "two", (8, 8)), ("one.png", "first line", (8, 8)),
                                    ("three.png", "from the table", (8, 8))]
    assert len(warnings) == 1 and "1 caption file(s) hold several lines" in warnings[0] and "one.txt" in warnings[0]
    (tmp_path / "c.caption").write_text("kohya's default extension")
    image(tmp_path / "c.png")
    (tmp_path / "one.caption").write_text("first line")
    (tmp_path / "deep" / "two.caption").write_text("two")
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "three.caption").write_text("3")
    recs, _ = read(tmp_path, caption_extension=".caption")
    assert [r.caption for r in recs] == ["kohya's default extension", "two", "first line", "3"]


def test_sources_that_agree_are_fine_and_disagreeing_ones_name_both_places(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "same"}) + "\n"
                                             + json.dumps({"file_name": "b.png", "text": "table says"}) + "\n")
    (tmp_path / "a.txt").write_text("same\n")
    (tmp_path / "b.txt").write_text("file says")
    with pytest.raises(DataError, match=r"b\.png: two captions disagree: .*metadata\.jsonl:2 says 'table says', "
                                        r".*b\.txt says 'file says'"):
        read(tmp_path)
    (tmp_path / "b.txt").write_text("table says")
    assert [r.caption for r in read(tmp_path)[0]] == ["same", "table says"]


@pytest.mark.parametrize("lines, message", [
    ([{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}],
     r"metadata\.jsonl:2: .*gone\.png does not exist"),
    ([{"file_name": "a.png", "caption": "x"}], r"metadata\.jsonl:1: no 'text' field \(it has: file_name, caption\)"),
    ([{"text": "x"}], r"metadata\.jsonl:1: no file_name"),
    ([{"file_name": "a.png", "text": "x"}, {"file_name": "./a.png", "text": "y"}],
     r"metadata\.jsonl:2: file_name './a.png' is listed again \(first at .*metadata\.jsonl:1\)"),
    ([{"file_name": "../a.png", "text": "x"}], r"metadata\.jsonl:1: file_name '\.\./a\.png' is outside"),
    ([{"file_name": "notes.md", "text": "x"}], r"metadata\.jsonl:1: notes\.md is not an image"),
    ([{"file_name": "a.png", "text": 3}], r"metadata\.jsonl:1: 'text' is a int; expected the caption as a string"),
    (["not json"], r"metadata\.jsonl:1: malformed JSON"),
])
def test_table_errors_name_file_and_line(tmp_path, lines, message):
    image(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "metadata.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    with pytest.raises(DataError, match=message):
        read(tmp_path)


def test_uncaptioned_images_are_named_unreadable_skipped_with_one_warning_and_no_images(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "sub" / "b.png")
    (tmp_path / "a.txt").write_text("cap")
    with pytest.raises(DataError, match=r"1 image\(s\) have no caption: sub/b\.png; expected"):
        read(tmp_path)
    (tmp_path / "sub" / "b.png").write_bytes(b"not a png")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 broken")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    recs, warnings = read(tmp_path)
    assert rows(tmp_path, recs) == [("a.png", "cap", (8, 8))]
    assert warnings == [f"{tmp_path}: skipped 2 file(s) Pillow cannot open as images: c.jpg, sub/b.png"]
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"its 2 image file\(s\) cannot be opened: c\.jpg, sub/b\.png"):
        read(tmp_path)
    with pytest.raises(DataError, match=r"empty: it holds no images; expected images"):
        (tmp_path / "empty").mkdir()
        read(tmp_path / "empty")


def test_exif_orientation_gives_the_loaded_size(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored 20 wide, shown 20 tall
    Image.new("L", (20, 10)).save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.txt").write_text("rotated")
    assert read(tmp_path)[0][0].size == (10, 20)
    assert load_image(tmp_path / "r.jpg", 3).size == (10, 20) and load_image(tmp_path / "r.jpg", 3).mode == "RGB"


def test_caption_dropout_draws_from_the_generator():
    captions = [f"c{i}" for i in range(8)]
    dropped = drop_captions(captions, 0.5, torch.Generator().manual_seed(3))
    keep = torch.rand(8, generator=torch.Generator().manual_seed(3)) >= 0.5
    assert dropped == [c if k else "" for c, k in zip(captions, keep.tolist())] and "" in dropped and dropped != [""] * 8
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert drop_captions(captions, 0.0, g) == captions and torch.equal(g.get_state(), state)
    assert drop_captions(captions, 1.0, g) == [""] * 8
    with pytest.raises(ConfigError, match=r"caption dropout: 1\.5; expected a probability in \[0, 1\]"):
        drop_captions(captions, 1.5, g)


# ---------------------------------------------------------------- buckets


def test_buckets_are_multiples_within_the_area_and_ratio():
    assert make_buckets(64, 8) == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]
    for resolution, multiple, step in [(1024, 8, 64), (512, 8, None), (1024, 16, None), (16, 1, None)]:
        buckets = make_buckets(resolution, multiple, step=step)
        assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets) > 1
        for w, h in buckets:
            assert w % (step or multiple) == 0 and h % (step or multiple) == 0 and w % multiple == 0
            assert w * h <= resolution ** 2 and max(w / h, h / w) <= 2.0 and (h, w) in buckets
    assert make_buckets(512, 8, step=64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert make_buckets(64, 8, max_ratio=1.0) == [(64, 64)]
    with pytest.raises(ConfigError, match="step 12 with pixel multiple 8"):
        make_buckets(64, 8, step=12)


def test_an_image_goes_to_the_nearest_aspect_and_is_cropped_centred(tmp_path):
    buckets = make_buckets(64, 8)
    assert assign_buckets([(96, 48), (64, 66), (30, 50), (10, 100)], buckets) == [4, 2, 0, 0]
    assert nearest_bucket((72, 56), buckets) == 3
    im = load_image(image(tmp_path / "w.png", (96, 48)), 1)
    out = prepare(im, buckets[4])  # 80x48: no resize (96·48 already covers it), 8 px off each side
    expected = torch.arange(96, dtype=torch.float32)[8:88].div(255).expand(1, 48, 80)
    assert out.pixels.shape == (1, 48, 80) and torch.equal(out.pixels, expected)
    assert (out.original_size, out.crop_top_left, out.target_size, out.flipped) == ((48, 96), (0, 8), (48, 80), False)
    assert out.micro == (48, 96, 0, 8, 48, 80)
    big = prepare(load_image(image(tmp_path / "big.png", (240, 120), value=200), 3), buckets[4])
    assert big.pixels.shape == (3, 48, 80) and big.crop_top_left == (0, 8) and big.original_size == (120, 240)
    assert torch.allclose(big.pixels, torch.full_like(big.pixels, 200 / 255), atol=1e-6)


def test_random_crop_and_flip_are_reproducible_and_report_the_mirrored_offset(tmp_path):
    im = load_image(image(tmp_path / "w.png", (96, 48)), 1)
    column = torch.arange(96, dtype=torch.float32).div(255)
    seen = set()
    for seed in range(8):
        out = prepare(im, (80, 48), random_crop=True, flip=True, generator=torch.Generator().manual_seed(seed))
        again = prepare(im, (80, 48), random_crop=True, flip=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.pixels, again.pixels) and out.crop_top_left == again.crop_top_left
        top, left = out.crop_top_left
        assert top == 0 and 0 <= left <= 16
        unmirrored = 16 - left if out.flipped else left
        row = column[unmirrored:unmirrored + 80]
        assert torch.equal(out.pixels[0, 0], row.flip(0) if out.flipped else row)
        seen.add(out.flipped)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="generator"):
        prepare(im, (80, 48), flip=True)


def test_batch_sampler_one_bucket_per_batch_and_the_same_batches_after_set_state():
    assignment = [0, 0, 0, 4, 4, 2, 0]
    g = torch.Generator().manual_seed(0)
    sampler = BucketBatchSampler(assignment, 2, g)
    state = g.get_state()
    first = [sampler.next_batch() for _ in range(40)]
    g.set_state(state)
    assert [sampler.next_batch() for _ in range(40)] == first
    for batch in first:
        assert len({assignment[i] for i in batch}) == 1 and len(set(batch)) == len(batch) <= 2
    assert {i for b in first for i in b} == set(range(7))
    assert sum(b == [5] for b in first) > 0 and all(len(b) == 2 for b in first if assignment[b[0]] == 0)
    other = BucketBatchSampler(assignment, 2, torch.Generator().manual_seed(1))
    assert [other.next_batch() for _ in range(40)] != first


# ---------------------------------------------------------------- EMA


def test_ema_equals_the_closed_form_over_three_steps_with_and_without_warmup():
    values = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 4.0])]
    for warmup, decay in [(True, 0.9), (False, 0.5)]:
        p = torch.nn.Parameter(torch.tensor([10.0, 20.0]))
        ema = EMA({"lora.A": p}, decay=decay, warmup=warmup)
        for v in values:
            p.data.copy_(v)
            ema.update()
        if warmup:  # d1 = 0, d2 = min(0.9, 2/11), d3 = min(0.9, 3/12)
            s = values[0]
            s = 2 / 11 * s + 9 / 11 * values[1]
            s = 3 / 12 * s + 9 / 12 * values[2]
        else:
            s = torch.tensor([10.0, 20.0])
            for v in values:
                s = 0.5 * s + 0.5 * v
        assert torch.allclose(ema.shadow["lora.A"], s, atol=1e-6), warmup
    assert ema.current_decay() == 0.5 and EMA({}, decay=0.99).current_decay() == 0.0


def test_ema_swaps_back_exactly_and_its_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    params = {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16)),
              "b": torch.nn.Parameter(torch.ones(2, 3))}
    ema = EMA(params, decay=0.9)
    for step in range(3):
        for p in params.values():
            p.data.add_(0.37 * (step + 1))
        ema.update()
    trained = {n: p.detach().clone() for n, p in params.items()}
    with ema.swapped():
        assert torch.equal(params["b"], ema.shadow["b"]) and params["a"].dtype == torch.bfloat16
        assert torch.equal(params["a"], ema.shadow["a"].to(torch.bfloat16))
    assert all(torch.equal(params[n], trained[n]) for n in params)
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    state = load_file(tmp_path / "ema.safetensors")
    assert sorted(state) == ["shadow.a", "shadow.b", "updates"] and state["updates"].tolist() == [3]
    again = EMA(params, decay=0.9)
    again.load_state_dict(state)
    ema.update()
    again.update()
    assert again.updates == 4 and all(torch.equal(again.shadow[n], ema.shadow[n]) for n in params)
    ema.copy_to()
    assert torch.equal(params["b"], ema.shadow["b"])
    with pytest.raises(ModelError, match=r"missing \['shadow.b'\]"):
        EMA(params).load_state_dict({"updates": state["updates"], "shadow.a": state["shadow.a"]})


# ---------------------------------------------------------------- min-SNR


def test_min_snr_weights_equal_the_formula_and_give_every_target_the_same_x0_weight():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0])
    gamma = 5.0
    assert torch.allclose(min_snr_weights(snr, gamma, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weights(snr, gamma, "v_prediction"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21]))
    assert torch.allclose(min_snr_weights(snr, gamma, "sample"), torch.tensor([0.0, 0.5, 5.0, 5.0]))
    flow = [0.0, 0.5 / (1 + math.sqrt(0.5)) ** 2, 5 / (1 + math.sqrt(5)) ** 2, 5 / (1 + math.sqrt(20)) ** 2]
    assert torch.allclose(min_snr_weights(snr, gamma, "flow_matching"), torch.tensor(flow))
    sigma = torch.tensor([0.1, 0.4, 0.8])  # flow matching: the velocity loss is the x0 loss / σ²
    x0_weight = min_snr_weights(((1 - sigma) / sigma) ** 2, gamma, "flow_matching") / sigma ** 2
    assert torch.allclose(x0_weight, (((1 - sigma) / sigma) ** 2).clamp(max=gamma), atol=1e-5)
    with pytest.raises(ConfigError, match="prediction type 'x'; expected one of epsilon"):
        min_snr_weights(snr, gamma, "x")
