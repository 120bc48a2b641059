"""Shared by the benchmarks: the fixed test subset, accuracy of a classifier, and the CNN reference."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_classifier import DiffusionClassifier
from diffusion_classifier.adapters.loading import resolve_model_dir, weights_fingerprint
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.stats import standard_error

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs"  # fashion_mnist.py's stored evaluate runs


def child_process(module: str, *args: str) -> dict:
    """Popen/run keywords that run benchmark module `module` (its __spec__.name) with `args` in a fresh
    interpreter, the repository importable wherever the child starts."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY) + (os.pathsep + path if path else "")}
    return {"args": [sys.executable, "-m", module, *args], "env": env}


def model_fingerprint(model: str) -> str:
    """sha256 of a model's weights: caches and result files are keyed by it, not by the model's name."""
    return weights_fingerprint(resolve_model_dir(model))


def test_subset(n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).permutation(10000)[:n])


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).float().div(127.5).sub(1).unsqueeze(1)  # [N, 1, 28, 28] in [-1, 1]


def accuracy_of(clf: DiffusionClassifier, pixels: torch.Tensor, labels: np.ndarray, chunk: int = 64) -> dict:
    started = time.perf_counter()
    predictions, nfe = [], []
    for i in range(0, len(pixels), chunk):
        for r in clf.classify_pixels(pixels[i:i + chunk], [str(j) for j in range(i, i + chunk)]):
            predictions.append(r.prediction_index)
            nfe.append(r.nfe)
    seconds = time.perf_counter() - started
    correct = np.array(predictions) == labels
    return {"accuracy": float(correct.mean()), "nfe_per_image": float(np.mean(nfe)),
            "seconds_per_image": seconds / len(pixels), "images": len(pixels), "correct": correct_string(correct)}


def correct_string(correct: np.ndarray) -> str:
    """Per-image correctness as '0'/'1' characters: compact in JSON, enough for paired statistics later."""
    return (np.asarray(correct, dtype=np.uint8) + ord("0")).tobytes().decode("ascii")


def correct_from_string(text: str) -> np.ndarray:
    """The inverse of correct_string, as floats (1.0 = correct)."""
    return (np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")).astype(float)


def grid_run_dirs(model: str, grid: int | str = "*", runs_dir: Path = RUNS) -> list[Path]:
    """fashion_mnist.py's stored evaluate runs of the model's current weights (any image count)."""
    return sorted(Path(runs_dir).glob(f"{grid_run_name(model, '*', grid)}"))


def grid_run_name(model: str, n_images: int | str, grid: int | str, variant: str = "") -> str:
    """`variant` names a run with other prompts or scoring options than the default ones; such runs are kept
    out of grid_run_dirs (their errors are not the model's default errors)."""
    tag = f"-variant-{variant}" if variant else ""
    return f"{Path(model).name}-{model_fingerprint(model)[:10]}{tag}-test{n_images}-grid{grid}"


def stored_test_errors(model: str, indices: np.ndarray, timesteps: list[int]) -> np.ndarray | None:
    """[images, classes, timesteps] errors of these test images from a stored exhaustive run of the model's
    current weights in RUNS (fashion_mnist.py's accuracy section, default seed and loss), or None.

    Noise follows each image's pixels and the timestep, so these are the errors a fresh Exhaustive run at
    these timesteps would compute (up to float32 rounding): no network evaluations needed."""
    from diffusion_classifier.store import ResultsStore

    wanted = [f"test/{i}" for i in indices]
    for run_dir in grid_run_dirs(model):
        store = ResultsStore(run_dir)
        try:
            config = store.config()
            if (config.get("seed"), config.get("loss"), config.get("split")) != (0, "l2", "test"):
                continue
            by_id = store.error_matrices_by_id()
        finally:
            store.close()
        if all(w in by_id for w in wanted):
            grid = by_id[wanted[0]][1]
            if set(timesteps) <= set(grid):
                columns = [grid.index(t) for t in timesteps]
                return np.stack([by_id[w][0][:, 0, columns] for w in wanted])
    return None


def replayed_accuracy(strategy, errors: list[np.ndarray], grid: list[int], labels: np.ndarray,
                      num_train_timesteps: int = 1000) -> dict:
    """Accuracy and NFE of `strategy` replayed on stored exhaustive errors (one [classes, prompts, grid] per image)."""
    correct, nfe = replayed_decisions(strategy, errors, grid, labels, num_train_timesteps)
    return {"accuracy": float(correct.mean()),
            "accuracy_standard_error": standard_error(correct),
            "nfe_mean": float(nfe.mean()), "nfe_p95": float(np.percentile(nfe, 95)), "images": len(correct)}


def replayed_decisions(strategy, errors: list[np.ndarray], grid: list[int], labels: np.ndarray,
                       num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether `strategy` replayed on its stored errors is right, and its NFE."""
    tables = [replay(strategy, e, grid, num_train_timesteps) for e in errors]
    return np.array([t.ranking()[0] for t in tables]) == labels, np.array([t.nfe for t in tables])




class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and integer shifts of up to max_shift pixels, drawn per image (on x's device,
    from a generator on that device)."""
    n, device = len(x), x.device
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=device))
    size = x.shape[-1]
    steps = torch.arange(size, device=device)
    rows = (dy.view(-1, 1) + steps).view(n, 1, size, 1).expand(n, 1, size, padded.shape[-1])
    x = padded.gather(2, rows)
    cols = (dx.view(-1, 1) + steps).view(n, 1, 1, size).expand(n, 1, size, size)
    return x.gather(3, cols)


class CNNTrainer:
    """The benchmarks' one CNN reference trainer: SmallCNN, Adam at 1e-3, batches of 128 drawn by a seeded
    generator, optionally flips+shifts; trained for time budgets in slices (train_for), resumable through
    state_dict, on any device."""

    BATCH = 128

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augmentation: bool = False, device="cpu", seed: int = 0):
        torch.manual_seed(seed)  # the initialisation
        self.x, self.y, self.augmentation = x.to(device), y.to(device), augmentation
        self.model = SmallCNN().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.steps, self.seconds = 0, 0.0

    def train_for(self, seconds: float) -> None:
        self.model.train()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            index = torch.randint(0, len(self.x), (self.BATCH,), generator=self.generator, device=self.x.device)
            batch = augment(self.x[index], self.generator) if self.augmentation else self.x[index]
            loss = F.cross_entropy(self.model(batch), self.y[index])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.steps += 1
        self.seconds += time.perf_counter() - started
        self.model.eval()

    @property
    def epochs(self) -> float:
        return self.steps * self.BATCH / len(self.x)

    def correct(self, pixels: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        return cnn_correct(self.model, pixels.to(self.x.device), labels)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps, self.seconds = state["steps"], state["seconds"]


def cnn_reference(minutes: float, seed: int = 0) -> tuple[SmallCNN, dict]:
    """Train (or load the cached) CNN on the full training set for a fixed CPU time budget."""
    path = RESULTS / "cnn_reference.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        if state["minutes"] == minutes:
            model = SmallCNN()
            model.load_state_dict(state["model"])
            return model.eval(), state["info"]
    images, labels = fashion_mnist_arrays("train")
    trainer = CNNTrainer(to_pixels(images), torch.from_numpy(labels), seed=seed)
    trainer.train_for(minutes * 60)
    info = {"minutes": minutes, "steps": trainer.steps, "images_seen": trainer.steps * CNNTrainer.BATCH,
            "epochs": trainer.epochs, "augmentation": "none"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save({"model": trainer.model.state_dict(), "minutes": minutes, "info": info}, path)
    return trainer.model, info


@torch.inference_mode()
def cnn_correct(model: SmallCNN, pixels: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    predictions = torch.cat([model(pixels[i:i + 2000]).argmax(1) for i in range(0, len(pixels), 2000)])
    return predictions.cpu().numpy() == labels


def cnn_accuracy(model: SmallCNN, pixels: torch.Tensor, labels: np.ndarray) -> float:
    return float(cnn_correct(model, pixels, labels).mean())


