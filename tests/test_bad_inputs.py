"""A corpus of broken and unusual inputs: evaluate records failures and goes on; classify names them."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_classifier.cli import main
from diffusion_classifier.store import ResultsStore

from .conftest import random_images


def _huge_png_header(path: Path, width: int, height: int) -> None:
    """A valid PNG header declaring a decompression-bomb size (never decoded)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def make_corpus(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(unreadable files, readable-but-unusual files)."""
    root.mkdir(parents=True, exist_ok=True)
    base = random_images(1, size=40)[0]
    good_png, good_jpg = root / "ok.png", root / "ok.jpg"
    base.save(good_png)
    base.save(good_jpg, quality=90)
    bad = {"zero-byte": root / "zero.png", "truncated png": root / "trunc.png",
           "truncated jpeg": root / "trunc.jpg", "not an image": root / "text.jpg", "bomb": root / "bomb.png"}
    bad["zero-byte"].write_bytes(b"")
    bad["truncated png"].write_bytes(good_png.read_bytes()[: len(good_png.read_bytes()) // 2])
    bad["truncated jpeg"].write_bytes(good_jpg.read_bytes()[: len(good_jpg.read_bytes()) // 3])
    bad["not an image"].write_text("hello, I am a text file")
    _huge_png_header(bad["bomb"], 20000, 20000)
    odd = {"cmyk jpeg": root / "cmyk.jpg", "16-bit png": root / "deep.png", "animated gif": root / "anim.gif",
           "unicode name": root / "ünïcødé 图像.png", "large": root / "large.png", "palette": root / "pal.png"}
    base.convert("CMYK").save(odd["cmyk jpeg"])
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(odd["16-bit png"])
    frames = random_images(3, size=40, seed=3)
    frames[0].save(odd["animated gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    base.save(odd["unicode name"])
    Image.new("L", (3000, 2000), 128).save(odd["large"])
    base.convert("P").save(odd["palette"])
    return bad, odd


def test_classify_names_unreadable_files(models, tmp_path, capsys):
    bad, _ = make_corpus(tmp_path)
    for name, path in bad.items():
        code = main(["classify", str(path), "--model", str(models["sd"]), "--timesteps", "2"])
        err = capsys.readouterr().err
        assert code == 2 and str(path) in err and err.count("\n") == 1, (name, err)


def test_classify_handles_unusual_but_valid_files(models, tmp_path, capsys):
    _, odd = make_corpus(tmp_path)
    code = main(["classify", *map(str, odd.values()), "--model", str(models["sd"]), "--labels", "cat,dog",
                 "--timesteps", "2", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == len(odd)
    assert [json.loads(line)["image"] for line in out] == [str(p) for p in odd.values()]


def test_evaluate_records_failures_and_goes_on(models, tmp_path, capsys):
    bad, odd = make_corpus(tmp_path / "corpus")
    data = tmp_path / "data"
    for c, group in enumerate((bad, odd)):
        (data / f"class{c}").mkdir(parents=True)
        for path in group.values():
            (data / f"class{c}" / path.name).write_bytes(path.read_bytes())
    code = main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels", "cat,dog",
                 "--out", str(tmp_path / "run"), "--timesteps", "2", "--quiet", "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["failed"] == len(bad) and metrics["images"] == len(odd)
    store = ResultsStore(tmp_path / "run")
    failed = [r for r in store.records() if r["status"] == "failed"]
    store.close()
    assert all(r["error"].startswith("cannot read image") for r in failed)
    assert main(["report", str(tmp_path / "run"), "--no-plots"]) == 0
    assert f"({len(bad)} failed)" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["cat\ncat\n", "\n\n", "cat\n\ndog\n"])
def test_label_files_blank_lines_duplicates(models, tmp_path, capsys, content):
    labels = tmp_path / "labels.txt"
    labels.write_text(content)
    image = tmp_path / "x.png"
    random_images(1)[0].save(image)
    code = main(["classify", str(image), "--model", str(models["sd"]), "--labels-file", str(labels),
                 "--timesteps", "2"])
    err = capsys.readouterr().err
    if content == "cat\n\ndog\n":
        assert code == 0
    else:
        assert code == 2 and ("duplicate" in err or "empty" in err)


@pytest.mark.parametrize("labels", ["", " , ", "cat,,dog"])
def test_an_explicitly_empty_label_list_is_an_error(models, tmp_path, capsys, labels):
    image = tmp_path / "x.png"
    random_images(1, size=8, mode="L")[0].save(image)
    assert main(["classify", str(image), "--model", str(models["pixel_class"]), "--labels", labels,
                 "--timesteps", "2"]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and len(err.strip().splitlines()) == 1


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_checkpoints_with_pickled_code_are_refused(models, tmp_path):
    import pickle
    import shutil

    from diffusion_classifier import UserError, load_denoiser

    model = tmp_path / "model"
    shutil.copytree(models["pixel_class"], model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    with open(model / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(UserError):
        load_denoiser(model)
    assert not marker.exists()
