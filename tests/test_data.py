import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_classifier import UserError
from diffusion_classifier.data import image_folder, load_image, preprocess, read_subset
from diffusion_classifier.tasks.labels import parse_label_list, validate_templates


def test_resize_short_side_then_center_crop():
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, 15:25] = 255  # a bright centre band, 10 px wide: 5 px after the resize to 10 x 20
    out = preprocess([Image.fromarray(array)], resolution=10, channels=1)
    assert out.shape == (1, 1, 10, 10)
    assert out.min() >= -1 and out.max() <= 1
    assert out[0, 0, :, 4:6].mean() > 0.9  # the band sits in the middle of the centre crop
    assert out[0, 0, :, 0].mean() < 0 and out[0, 0, :, -1].mean() < 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_every_mode_becomes_what_the_model_takes(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    img = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    for channels in (1, 3):
        out = preprocess([img], resolution=8, channels=channels)
        assert out.shape == (1, channels, 8, 8) and torch.isfinite(out).all()
        assert out.min() >= -1 and out.max() <= 1


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = preprocess([rgba], resolution=4, channels=3)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_grayscale_is_replicated_for_rgb_models():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    out = preprocess([gray], resolution=8, channels=3)
    torch.testing.assert_close(out[0, 0], out[0, 1])
    torch.testing.assert_close(out[0, 1], out[0, 2])


def test_truncated_and_fake_images_are_user_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8) + 100).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(UserError, match="cannot read image"):
            load_image(path)
    assert load_image(good).size == (32, 32)


def test_image_folder_layout(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.new("L", (4, 4)).save(tmp_path / name / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path)
    assert ds.class_names == ["a", "b"] and list(ds.labels) == [0, 1] and ds.ids == ["a/x.png", "b/x.png"]
    with pytest.raises(UserError, match="out of range"):
        ds.subset([5])


def test_subset_and_label_parsing(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("3\n\n# comment\n1  \n")
    assert read_subset(f) == [3, 1]
    f.write_text("x\n")
    with pytest.raises(UserError, match="not an integer"):
        read_subset(f)
    assert parse_label_list(" a , b ") == ["a", "b"]
    with pytest.raises(UserError):
        parse_label_list("a,b", expected=3)
    with pytest.raises(UserError):
        validate_templates(["{} and {}"])


def test_csv_and_jsonl_manifests(tmp_path):
    import json

    from diffusion_classifier.data import load_dataset

    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (4, 4)).save(tmp_path / "img" / name)
    (tmp_path / "m.csv").write_text("path,label\nimg/a.png,dog\nimg/b.png,cat\nimg/c.png,dog\n")
    ds = load_dataset(str(tmp_path / "m.csv"))
    assert ds.class_names == ["cat", "dog"] and list(ds.labels) == [1, 0, 1]
    assert ds.items[0] == tmp_path / "img" / "a.png"
    lines = [json.dumps({"path": str(tmp_path / "img" / n), "label": lab}) for n, lab in (("a.png", 1), ("b.png", 0))]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(tmp_path / "m.jsonl"))
    assert ds.class_names == ["0", "1"] and list(ds.labels) == [1, 0]
    (tmp_path / "bad.csv").write_text("file,class\nx,y\n")
    with pytest.raises(UserError, match="columns 'path' and 'label'"):
        load_dataset(str(tmp_path / "bad.csv"))


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffusion_classifier.data import load_dataset

    images = [Image.new("L", (4, 4), v) for v in (0, 100, 200)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    loaded = load_dataset(str(tmp_path / "hf"), "test")
    assert loaded.class_names == ["x", "y"] and list(loaded.labels) == [0, 1, 1]
    assert np.asarray(loaded.subset([2]).items[0]).mean() == 200
