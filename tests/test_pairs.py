"""The Fashion-MNIST pairs layout: the canvas contract, Winoground-style examples, training composites,
and non-square models end to end."""

import json
import re

import numpy as np
import torch

from diffusion_classifier.data import preprocess
from diffusion_classifier.training.pairs import (
    ITEM,
    PairSampler,
    compose,
    load_spec,
    winoground_examples,
    write_winoground,
)


def _items(n_per_class=4, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n_per_class * classes, ITEM, ITEM), dtype=np.uint8)
    return images, np.repeat(np.arange(classes), n_per_class)


def test_the_canvas_contract():
    a, b = np.full((28, 28), 10, np.uint8), np.full((28, 28), 200, np.uint8)
    canvas = compose(a, b)
    assert canvas.shape == (28, 56) and (canvas[:, :28] == 10).all() and (canvas[:, 28:] == 200).all()
    assert (compose(None, b)[:, :28] == 0).all()
    pixels = preprocess([canvas], (28, 56), channels=1)  # a pair at the model's size is left whole
    assert pixels.shape == (1, 1, 28, 56)
    np.testing.assert_allclose(pixels[0, 0].numpy(), canvas / 127.5 - 1, atol=1e-6)
    square = preprocess([a], (28, 56), channels=1)  # other sizes cover the canvas, then center-crop
    assert square.shape == (1, 1, 28, 56)


def test_winoground_examples_swap_the_words_and_use_other_instances(tmp_path):
    images, labels = _items()
    spec = load_spec()
    examples = winoground_examples(images, labels, 40, seed=1, spec=spec)
    heldout = [ex for ex in examples if ex.tag == "heldout-template"]
    assert len(heldout) == 20
    for ex in examples:
        a, b = ex.classes
        assert a != b
        words = [sorted(re.findall(r"[\w-]+", c)) for c in (ex.caption_0, ex.caption_1)]
        assert words[0] == words[1] and ex.caption_0 != ex.caption_1  # the same words, in another order
        assert spec["names"][a] in ex.caption_0 and spec["names"][b] in ex.caption_0
        left0, right0, left1, right1 = ex.image_0[:, :28], ex.image_0[:, 28:], ex.image_1[:, :28], ex.image_1[:, 28:]
        assert labels[[i for i in range(len(images)) if (images[i] == left0).all()][0]] == a
        assert labels[[i for i in range(len(images)) if (images[i] == left1).all()][0]] == b
        assert not (left0 == right1).all() and not (right0 == left1).all()  # other instances of a and b
    for ex in examples:
        a, b = ex.classes
        templates = spec["heldout_templates" if ex.tag == "heldout-template" else "train_templates"]
        assert ex.caption_0 in [t.format(left=spec["names"][a], right=spec["names"][b]) for t in templates]
    manifest = write_winoground(examples[:3], tmp_path / "set")
    first = json.loads(manifest.read_text().splitlines()[0])
    assert (tmp_path / "set" / first["image_0"]).is_file() and first["tag"] in ("train-template", "heldout-template")


def test_training_composites_match_their_captions():
    images, labels = _items()
    items = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    spec = load_spec()
    sampler = PairSampler(items, torch.as_tensor(labels), spec, single_prob=0.3)
    heldout = {t.split("{")[0] for t in spec["heldout_templates"] if not t.startswith("{")}
    assert not any(c.startswith(tuple(heldout)) for c in sampler.captions if c)
    x0, captions = sampler.batch(64, torch.Generator().manual_seed(0), empty_prob=0.0)
    assert x0.shape == (64, 1, 28, 56) and (captions > 0).all()
    lookup = {tuple(items[i].flatten().tolist()): int(labels[i]) for i in range(len(items))}
    for image, caption in zip(x0, captions.tolist()):
        text = sampler.captions[caption]
        halves = [image[:, :, :28], image[:, :, 28:]]
        blank = [bool((h == -1).all()) for h in halves]
        if any(blank):  # a single item: the caption names its side
            side = "left" if blank[1] else "right"
            assert side in text and "on the" in text
            c = lookup[tuple(halves[0 if side == "left" else 1].flatten().tolist())]
        else:
            a, b = (lookup[tuple(h.flatten().tolist())] for h in halves)
            assert a != b
            phrases_a = [spec["names"][a], *spec["train_synonyms"][a]]
            phrases_b = [spec["names"][b], *spec["train_synonyms"][b]]
            assert any(text == t.format(left=pa, right=pb) for t in spec["train_templates"]
                       for pa in phrases_a for pb in phrases_b)
            continue
        assert any(p in text for p in [spec["names"][c], *spec["train_synonyms"][c]])
    _, with_empty = sampler.batch(200, torch.Generator().manual_seed(1), empty_prob=0.5)
    assert 0.3 < (with_empty == 0).float().mean() < 0.7


def test_swapped_captions_are_the_same_words_with_the_items_exchanged():
    sampler = PairSampler(torch.zeros(20, 1, 28, 28), torch.arange(10).repeat(2), load_spec())
    pairs = torch.nonzero(sampler.swapped >= 0).flatten().tolist()
    assert len(pairs) == 90 * 6 * 9  # every pair caption: 90 ordered pairs x 6 templates x 3 x 3 phrases
    for k in pairs[::97]:
        m = int(sampler.swapped[k])
        a, b = sampler.captions[k], sampler.captions[m]
        assert a != b and sorted(re.findall(r"[\w-]+", a)) == sorted(re.findall(r"[\w-]+", b))
        assert int(sampler.swapped[m]) == k
