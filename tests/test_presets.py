"""The paper's datasets as presets: data files, ImageFolder layouts, and the CLI without --labels."""

import json

import pytest

from diffusion_classifier import DiffusionClassifier, UserError, preset
from diffusion_classifier.cli import main
from diffusion_classifier.data import image_folder as load_image_folder
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.tasks.presets import PRESET_NAMES

from .conftest import image_folder

SIZES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "pets": 37, "flowers": 102, "food": 101, "aircraft": 100,
         "imagenet": 1000, "objectnet": 113, "mnist": 10, "fashion-mnist": 10}


def test_every_dataset_of_the_issue_has_a_preset():
    assert sorted(PRESET_NAMES) == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_presets_are_complete_and_consistent(name):
    p = preset(name)
    assert len(p.classes) == SIZES[name] and len(set(p.classes)) == len(p.classes)
    labels, prompts = p.candidates()
    assert labels == list(p.classes) and len(prompts) == len(labels) and all(prompts)
    if p.folders:
        assert len(p.folders) == len(p.classes) and len(set(p.folders)) == len(p.folders)
    assert all(p.label_of_folder(c) == i for i, c in enumerate(p.classes))
    assert p.layout and (p.paper_accuracy is None or 0 < p.paper_accuracy < 1)


def test_the_papers_prompts_are_kept_where_they_are_not_one_template():
    _, prompts = preset("pets").candidates()
    assert prompts[0] == ["a photo of a Abyssinian cat, a type of pet."]
    assert prompts[1] == ["a photo of a American Bulldog, a type of pet."]  # no " dog", as in the paper
    assert prompts[2] == ["a photo of a American Pit Bull Terrier dog, a type of pet."]
    assert preset("cifar10").candidates()[1][3] == ["a blurry photo of a cat."]
    assert preset("food").candidates()[1][0] == ["a photo of apple pie, a type of food."]
    # given labels or templates replace the preset's
    assert preset("pets").candidates(["dog"])[1] == [["a photo of a dog, a type of pet."]]
    assert preset("cifar10").candidates(templates=["{}"])[1][:2] == [["airplane"], ["automobile"]]


@pytest.mark.parametrize("name, folders, expected", [
    ("cifar10", ["truck", "airplane", "automobile"], {"truck": 9, "airplane": 0, "automobile": 1}),
    ("cifar10", ["0", "3", "9"], {"0": 0, "3": 3, "9": 9}),
    ("flowers", ["1", "2", "102"], {"1": 0, "2": 1, "102": 101}),  # the original 1-based numbering
    ("imagenet", ["n01440764", "n01443537", "n15075141"], {"n01440764": 0, "n01443537": 1, "n15075141": 999}),
    ("food", ["apple_pie", "waffles"], {"apple_pie": 0, "waffles": 100}),
    ("pets", ["Abyssinian", "american_bulldog"], {"Abyssinian": 0, "american_bulldog": 1}),
    ("aircraft", ["F-16A_B", "707-320"], {"F-16A_B": 72, "707-320": 0}),
    ("objectnet", ["alarm_clock", "binder_closed"], {"alarm_clock": 0, "binder_closed": 8}),
    ("cifar100", ["aquarium_fish", "willow_tree"], {"aquarium_fish": 1, "willow_tree": 96}),
])
def test_image_folders_map_onto_the_label_order(tmp_path, name, folders, expected):
    dataset = preset(name).relabel(load_image_folder(image_folder(tmp_path, folders, per_class=2)))
    assert dataset.class_names == list(preset(name).classes)
    for item, label in zip(dataset.items, dataset.labels):
        assert label == expected[item.parent.name]


def test_unknown_folders_are_one_line_errors(tmp_path):
    dataset = load_image_folder(image_folder(tmp_path, ["airplane", "zebra"], per_class=1))
    with pytest.raises(UserError, match="'zebra' is not a class of the cifar10 preset"):
        preset("cifar10").relabel(dataset)
    with pytest.raises(UserError, match="unknown preset"):
        preset("cifar-11")


def test_classifier_takes_names_prompts_and_schedule_from_a_preset(models):
    clf = DiffusionClassifier.from_pretrained(models["sd"], preset="cifar10")
    assert clf.classes_ == list(preset("cifar10").classes)
    assert clf.prompts_[0] == ["a blurry photo of a airplane."]
    assert clf.strategy.n_samples == [50, 500] and clf.config.loss == "l1"
    from diffusion_classifier import Exhaustive

    mine = DiffusionClassifier.from_pretrained(models["sd"], preset="pets", labels=["cat", "dog"],
                                               strategy=Exhaustive(3))
    assert mine.prompts_ == [["a photo of a cat, a type of pet."], ["a photo of a dog, a type of pet."]]
    assert mine.strategy.n_timesteps == 3 and mine.config.loss == "l2"


def test_evaluate_with_a_preset_needs_no_labels(models, tmp_path, capsys):
    data = image_folder(tmp_path / "cifar", ["cat", "airplane"], per_class=1, mode="RGB")
    out = tmp_path / "run"
    code = main(["evaluate", "--data", str(data), "--model", str(models["sd"]), "--preset", "cifar10",
                 "--strategy", "exhaustive", "--timesteps", "2", "--out", str(out), "--quiet", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["images"] == 2 and metrics["nfe_per_image"] == 10 * 2  # all ten CIFAR-10 classes
    with ResultsStore(out) as store:
        assert "a blurry photo of a airplane." in json.dumps(store.config())
        assert sorted(r["label"] for r in store.records()) == [0, 3]  # airplane, cat in CIFAR-10's order


def test_imagenet_names_are_unique_but_the_papers_prompts_are_kept():
    p = preset("imagenet")
    labels, prompts = p.candidates()
    assert labels[744] == "projectile, missile" and labels[836] == "sunglass"
    assert prompts[744] == prompts[657] == ["a photo of a missile."]  # as in the paper (and CLIP's names)
    assert prompts[836] == prompts[837] == ["a photo of a sunglasses."]
    assert prompts[21] == ["a photo of a kite (bird of prey)."]
