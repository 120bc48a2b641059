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
from .tasks.presets import preset

EXAMPLES = RESOURCES / "examples"
DEFAULT_TEMPLATE = preset("fashion-mnist").templates[0]  # the examples are Fashion-MNIST test images


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server
    try:
        import gradio
    except ImportError:
        raise UserError('serve needs gradio: pip install "diffusion-classifier[demo]" (or ".[demo]")') from None
    return gradio


PAIRS_EXAMPLE_CAPTIONS = "a sneaker to the left of a bag\na bag to the left of a sneaker"


def _user_error(gr, message: str):
    """A page error shown to the user, without a traceback on the server's console."""
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:  # gradio before print_exception
        return gr.Error(message)


class DemoModel:
    """One loaded model and the classifiers built for it, keyed by (labels, template, timesteps)."""

    def __init__(self, model: str, device: str = "auto"):
        from .adapters.loading import load_denoiser

        self.model = model
        self.denoiser = load_denoiser(model, device=device)
        self.text = self.denoiser.conditioning == "text"
        self.pairs = self.denoiser.info.layout == "pairs"  # two items side by side: captions, not single labels
        self.default_labels = "" if self.pairs else ", ".join(self.denoiser.class_names or [])
        self.default_captions = PAIRS_EXAMPLE_CAPTIONS if self.pairs else ""
        self._classifier = lru_cache(maxsize=8)(self._build)

    def _build(self, labels: tuple[str, ...] | None, template: str, timesteps: int):
        from .engine.strategies import Exhaustive
        from .tasks.classifier import DiffusionClassifier

        return DiffusionClassifier(self.denoiser, labels=list(labels) if labels else None,
                                   templates=[template] if self.text else None, strategy=Exhaustive(timesteps))

    def run(self, image, labels_text: str, template: str, timesteps: int,
            captions_text: str = "") -> tuple[dict | None, str, dict]:
        """Captions given (text models): rank them; else classify by the labels."""
        if image is None:
            raise UserError("drop or pick an image first")
        captions = [line.strip() for line in (captions_text or "").splitlines() if line.strip()]
        if captions and self.text:
            return self.match(image, captions, timesteps)
        return self.classify(image, labels_text, template, timesteps)

    def classify(self, image, labels_text: str, template: str, timesteps: int) -> tuple[dict, str, dict]:
        """({label: probability}, a line of cost, per-timestep errors of the top classes)."""
        from .tasks.labels import parse_label_list

        if image is None:
            raise UserError("drop or pick an image first")
        labels = tuple(parse_label_list(labels_text)) if labels_text.strip() else None
        clf = self._classifier(labels, (template or DEFAULT_TEMPLATE).strip(), int(timesteps))
        result = clf.classify([image])[0]
        probabilities = clf.probabilities([result])[0]
        confidences = {name: float(p) for name, p in zip(clf.classes_, probabilities)}
        tie = f" (tied with {', '.join(result.tied_with)}: no decision)" if result.tied_with else ""
        cost = (f"**{result.prediction}**{tie}: {result.nfe} network evaluations ({len(clf.classes_)} labels x "
                f"{len(result.timesteps)} timesteps), {result.seconds:.2f} s; probabilities "
                f"{clf.probability_source}")
        top = [clf.classes_.index(label) for label, _ in result.ranking[:3]]
        return confidences, cost, _errors_per_timestep(result.errors.mean(axis=1), result.timesteps, top,
                                                       clf.classes_)

    def match(self, image, captions: list[str], timesteps: int) -> tuple[None, str, dict]:
        """Rank captions for the image: a table of mean errors (lower is better) in place of probabilities."""
        from .engine.strategies import Exhaustive
        from .tasks.matching.matcher import ImageTextMatcher

        matcher = ImageTextMatcher(self.denoiser, strategy=Exhaustive(int(timesteps)), with_null=False)
        matching = matcher.match([image], captions)
        row = matching.rankings("image")[0]
        lines = [f"**{row['ranking'][0]['text']}**{' (a tie: no decision)' if row['ranking'][0]['tie'] else ''}: "
                 f"{row['nfe']} network evaluations ({len(captions)} captions x {int(timesteps)} timesteps), "
                 f"{row['seconds']:.2f} s", "", "| rank | caption | mean error (lower is better) |", "|---|---|---|"]
        lines += [f"| {k} | {e['text']} | {e['score']:.5f}{' (tie)' if e['tie'] else ''} |"
                  for k, e in enumerate(row["ranking"], 1)]
        scored = matching.images[0]
        top = [captions.index(e["text"]) for e in row["ranking"][:3]]
        return None, "\n".join(lines), _errors_per_timestep(scored.errors, scored.timesteps, top, captions)


def _errors_per_timestep(errors: np.ndarray, timesteps: list[int], rows: list[int], names: list[str]) -> dict:
    """Long-format errors of some candidates over timesteps (errors: [candidates, columns]) for the line plot."""
    order = np.argsort(timesteps)
    out = {"timestep": [], "error": [], "label": []}
    for c in rows:
        out["timestep"] += [int(timesteps[i]) for i in order]
        out["error"] += errors[c][order].tolist()
        out["label"] += [names[c]] * len(order)
    return out


PAGE_CSS = "#image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def _css_where(method) -> dict:
    """The page's style sheet as `method` takes it: gradio 4 and 5 take css in Blocks(), gradio 6 in launch()."""
    import inspect

    return {"css": PAGE_CSS} if "css" in inspect.signature(method).parameters else {}


def build_app(model: str = "fashion-mnist-text", device: str = "auto", timesteps: int = 10):
    gr = _gradio()
    import pandas as pd

    demo_model = DemoModel(model, device)

    def run(image, labels_text, template, steps, captions_text=""):
        try:
            confidences, cost, errors = demo_model.run(image, labels_text, template, steps, captions_text)
        except UserError as exc:
            raise _user_error(gr, str(exc)) from None
        return confidences, cost, pd.DataFrame(errors)

    with gr.Blocks(title="diffusion-classifier", **_css_where(gr.Blocks.__init__)) as app:
        gr.Markdown(f"# diffusion-classifier\nZero-shot classification by denoising error with `{model}`: the "
                    "label (or caption) under which the model predicts the added noise best wins. Every candidate "
                    "is scored at the same timesteps and noise.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image", height=280)
                labels = gr.Textbox(value=demo_model.default_labels, label="labels (comma-separated; empty: the "
                                    "model's own)", elem_id="labels", visible=not demo_model.pairs)
                template = gr.Textbox(value=DEFAULT_TEMPLATE, label="prompt template",
                                      visible=demo_model.text and not demo_model.pairs, elem_id="template")
                captions = gr.Textbox(value=demo_model.default_captions, lines=4, visible=demo_model.text,
                                      label="captions, one per line (ranked instead of the labels when given)",
                                      elem_id="captions")
                steps = gr.Slider(1, 50, value=timesteps, step=1, label="timesteps per candidate",
                                  elem_id="timesteps")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                ranked = gr.Label(num_top_classes=5, label="ranked labels (probability)", elem_id="ranked")
                cost = gr.Markdown(elem_id="cost")
                plot = gr.LinePlot(x="timestep", y="error", color="label", label="error per timestep, top 3",
                                   elem_id="errors")
        examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
        if examples and not demo_model.pairs:
            gr.Examples(examples=examples, inputs=image, label="examples (Fashion-MNIST test images)")
        button.click(run, inputs=[image, labels, template, steps, captions], outputs=[ranked, cost, plot])
    return app


def check_port(host: str, port: int) -> None:
    """A one-line error, before the model loads, when the port cannot be listened on."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using it? "
                        "choose another with --port") from None


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", timesteps: int = 10) -> None:
    check_port(host, port)
    app = build_app(model, device, timesteps)
    try:
        extra = {} if _css_where(type(app).__init__) else _css_where(app.launch)
        app.launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True,
                   prevent_thread_lock=True, **extra)
    except OSError as exc:  # taken between the check and the launch
        raise UserError(f"cannot listen on {host}:{port}: {str(exc).splitlines()[0]}") from None
    print(f"serving {model} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
