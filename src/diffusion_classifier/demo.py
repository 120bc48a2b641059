"""`diffusion-classifier serve`: a web page to try a model (gradio, the optional extra `demo`).

Drop or pick an image, type labels (or keep the model's), and see the ranked labels with probability
bars, the network evaluations spent, and the per-timestep errors of the leading classes. The page
listens on the loopback interface unless told otherwise.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .data import RESOURCES
from .errors import UserError
from .presets import preset

EXAMPLES = RESOURCES / "examples"
DEFAULT_TEMPLATE = preset("fashion-mnist").templates[0]  # the examples are Fashion-MNIST test images


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server
    try:
        import gradio
    except ImportError:
        raise UserError('serve needs gradio: pip install "diffusion-classifier[demo]" (or ".[demo]")') from None
    return gradio


class DemoModel:
    """One loaded model and the classifiers built for it, keyed by (labels, template, timesteps)."""

    def __init__(self, model: str, device: str = "cpu"):
        from .loading import load_denoiser

        self.model = model
        self.denoiser = load_denoiser(model, device=device)
        self.text = self.denoiser.conditioning == "text"
        self.default_labels = ", ".join(self.denoiser.class_names or [])
        self._classifier = lru_cache(maxsize=8)(self._build)

    def _build(self, labels: tuple[str, ...] | None, template: str, timesteps: int):
        from .classifier import DiffusionClassifier
        from .strategies import Exhaustive

        return DiffusionClassifier(self.denoiser, labels=list(labels) if labels else None,
                                   templates=[template] if self.text else None, strategy=Exhaustive(timesteps))

    def classify(self, image, labels_text: str, template: str, timesteps: int) -> tuple[dict, str, dict]:
        """({label: probability}, a line of cost, per-timestep errors of the top classes)."""
        from .labels import parse_label_list

        if image is None:
            raise UserError("drop or pick an image first")
        labels = tuple(parse_label_list(labels_text)) if labels_text.strip() else None
        clf = self._classifier(labels, (template or DEFAULT_TEMPLATE).strip(), int(timesteps))
        result = clf.classify([image])[0]
        probabilities = clf.probabilities([result])[0]
        confidences = {name: float(p) for name, p in zip(clf.classes_, probabilities)}
        cost = (f"**{result.prediction}**: {result.nfe} network evaluations ({len(clf.classes_)} labels x "
                f"{len(result.timesteps)} timesteps), {result.seconds:.2f} s")
        order = np.argsort(result.timesteps)
        top = [clf.classes_.index(label) for label, _ in result.ranking[:3]]
        errors = {"timestep": [], "error": [], "label": []}
        for c in top:
            per_t = np.nanmean(result.errors[c], axis=0)[order]  # mean over a class's prompts
            errors["timestep"] += [int(result.timesteps[i]) for i in order]
            errors["error"] += per_t.tolist()
            errors["label"] += [clf.classes_[c]] * len(order)
        return confidences, cost, errors


def build_app(model: str = "fashion-mnist-text", device: str = "cpu", timesteps: int = 10):
    gr = _gradio()
    import pandas as pd

    demo_model = DemoModel(model, device)

    def run(image, labels_text, template, steps):
        try:
            confidences, cost, errors = demo_model.classify(image, labels_text, template, steps)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        return confidences, cost, pd.DataFrame(errors)

    with gr.Blocks(title="diffusion-classifier") as app:
        gr.Markdown(f"# diffusion-classifier\nZero-shot classification by denoising error with `{model}`: the "
                    "label under which the model predicts the added noise best wins. Every label is scored at "
                    "the same timesteps and noise.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image")
                labels = gr.Textbox(value=demo_model.default_labels, label="labels (comma-separated; empty: the "
                                    "model's own)", elem_id="labels")
                template = gr.Textbox(value=DEFAULT_TEMPLATE, label="prompt template", visible=demo_model.text,
                                      elem_id="template")
                steps = gr.Slider(1, 50, value=timesteps, step=1, label="timesteps per label", elem_id="timesteps")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                ranked = gr.Label(num_top_classes=5, label="ranked labels (probability)", elem_id="ranked")
                cost = gr.Markdown(elem_id="cost")
                plot = gr.LinePlot(x="timestep", y="error", color="label", label="error per timestep, top 3",
                                   elem_id="errors")
        examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
        if examples:
            gr.Examples(examples=examples, inputs=image, label="examples (Fashion-MNIST test images)")
        button.click(run, inputs=[image, labels, template, steps], outputs=[ranked, cost, plot])
    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", timesteps: int = 10) -> None:
    app = build_app(model, device, timesteps)
    print(f"serving {model} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    app.launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True)
