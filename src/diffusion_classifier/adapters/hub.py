"""Which files of a pipeline are loaded, and fetching exactly those from the Hugging Face hub.

model_index.json names the components. From each named component's folder we take its configs and
tokenizer files and one set of weights: safetensors (pickled .bin only where a folder has no safetensors),
in one variant, sharded files together with their index. Nothing else is fetched: the single-file
checkpoints at a repository's root, ONNX / Flax / OpenVINO exports, and folders model_index.json does not
name (SDXL's vae_1_0, SD3.5's text_encoders) stay on the hub.

Variants: "fp16" files are taken when asked for and present; full files otherwise; a folder that holds only
variant files (a repository published in fp16 alone) gives its variant. The same rule picks the files when
loading a local directory, so a hub snapshot and a local copy load the same weights.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..errors import UserError

WEIGHT_STEMS = {"safetensors": ("diffusion_pytorch_model", "model"),
                "bin": ("diffusion_pytorch_model", "pytorch_model")}
_SHARD = r"(?:-\d{5}-of-\d{5})?"
_WEIGHT = re.compile(rf"^(?P<stem>[^./]+?)(?:\.(?P<variant>\w+))?{_SHARD}\.(?P<ext>safetensors|bin)$")
_INDEX = re.compile(r"^(?P<stem>[^./]+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$")
# every weight-like file (loadable weights, exports, other frameworks, single-file checkpoints): none is a config;
# the chosen weights are added back by choose_weights
WEIGHT_LIKE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".h5", ".pb",
                 ".gguf", ".xml", ".tflite", ".mlmodel", ".pdparams")
HALF_DTYPES = (torch.float16, torch.bfloat16)
VARIANTS_HELP = "auto (fp16 files where the repository has them and the scoring dtype is half), none (full files), " \
                "or a variant name such as fp16"


def resolve_variant(variant: str | None, dtype: torch.dtype) -> str | None:
    """The variant asked for: "auto" means fp16 for half-precision scoring, full files otherwise."""
    if variant in (None, "", "none"):
        return None
    if variant == "auto":
        return "fp16" if dtype in HALF_DTYPES else None
    if not re.fullmatch(r"\w+", variant):
        raise UserError(f"--variant: {variant!r} is not a variant name ({VARIANTS_HELP})")
    return variant


def _weight_group(name: str) -> tuple[str, str | None] | None:
    """(extension, variant) of a weight or weight-index file we may load, else None."""
    match = _WEIGHT.match(name) or _INDEX.match(name)
    if match is None or match["stem"] not in WEIGHT_STEMS[match["ext"]]:
        return None
    return match["ext"], match["variant"]


def choose_weights(names: Iterable[str], variant: str | None) -> tuple[list[str], str | None]:
    """(the weight files of one component folder to load, the variant they are in)."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for name in names:
        key = _weight_group(name)
        if key is not None:
            groups.setdefault(key, []).append(name)
    for ext in WEIGHT_STEMS:  # safetensors first
        options = {v: files for (e, v), files in groups.items() if e == ext}
        if not options:
            continue
        if variant in options:
            chosen = variant
        elif None in options:
            chosen = None
        else:  # only variant files: the repository was published that way
            chosen = "fp16" if "fp16" in options else sorted(options)[0]
        return sorted(options[chosen]), chosen
    return [], None


def component_files(names: Iterable[str], variant: str | None) -> tuple[list[str], str | None]:
    """(every file of one component folder to load: configs, tokenizer files and the chosen weights; variant)."""
    names = list(names)
    weights, chosen = choose_weights(names, variant)
    others = [n for n in names if not n.endswith(WEIGHT_LIKE_SUFFIXES) and not _INDEX.match(n)]
    return sorted(others) + weights, chosen


def pipeline_files(components: Sequence[str], repo_files: Iterable[str], variant: str | None,
                   skip_weights: Sequence[str] | bool = ()) -> list[str]:
    """The files of a pipeline repository to fetch: model_index.json and each named component's files (only the
    configs of those in `skip_weights`; True: of every component)."""
    by_folder: dict[str, list[str]] = {}
    for path in repo_files:
        parts = path.split("/")
        if len(parts) == 2:
            by_folder.setdefault(parts[0], []).append(parts[1])
    selected = ["model_index.json"]
    for name in components:
        files, _ = component_files(by_folder.get(name, []), variant)
        if skip_weights is True or name in skip_weights:
            files = [f for f in files if _weight_group(f) is None]
        selected += [f"{name}/{f}" for f in files]
    return selected


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hub_errors(repo_id: str, what: str = "model") -> Iterator[None]:
    """The hub's errors as one line that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "then log in with `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"
    try:
        yield
    except GatedRepoError as exc:
        raise UserError(f"{repo_id} is a gated repository: accept its licence at {_endpoint()}/{repo_id} with your "
                        f"Hugging Face account, {login}") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"{what} {repo_id!r} was not found on the Hugging Face hub (check the id; a private "
                        f"repository needs you logged in: {login.removeprefix('then ')})") from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"{repo_id}: {str(exc).splitlines()[0]}") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if _offline():
            raise UserError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset "
                            "HF_HUB_OFFLINE once to download it") from exc
        raise UserError(f"could not reach the Hugging Face hub ({_endpoint()}) for {repo_id}, and it is not in the "
                        "local cache: check the connection (or set HF_HUB_OFFLINE=1 to use the cache only)") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise UserError(f"the Hugging Face hub refused {repo_id} (HTTP {status}): "
                        f"{str(exc).splitlines()[0]}") from exc
    except OSError as exc:  # connection errors below huggingface_hub's own types
        raise UserError(f"could not fetch {repo_id} from the Hugging Face hub: {str(exc).splitlines()[0]}") from exc


def _escaped(path: str) -> str:
    """A file name as an fnmatch pattern that matches only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def fetch_pipeline(repo_id: str, variant: str | None, components_of, skip_weights: Sequence[str] | bool = ()) -> Path:
    """Download a pipeline's files (pipeline_files) into the hub cache; its snapshot folder.

    components_of(model_index_path) -> the component names model_index.json lists (loading.py reads it).
    Offline (HF_HUB_OFFLINE) the cached snapshot is used when it holds every file the pipeline needs.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    with hub_errors(repo_id):
        try:
            index_path = Path(hf_hub_download(repo_id, "model_index.json"))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):  # offline or unreachable, not "no such file"
                raise
            raise UserError(_not_a_pipeline(repo_id)) from None
        components = components_of(index_path)
        if _offline():
            folder = index_path.parent
            have = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            wanted = pipeline_files(components, have, variant, skip_weights)
            missing = [c for c in components if not any(f.startswith(f"{c}/") for f in wanted)]
            if missing:
                raise UserError(f"{repo_id} is only partly in the local Hugging Face cache (missing: "
                                f"{', '.join(missing)}) and HF_HUB_OFFLINE is set: unset it once to download it")
            return folder
        repo_files = HfApi().list_repo_files(repo_id)
        wanted = pipeline_files(components, repo_files, variant, skip_weights)
        return Path(snapshot_download(repo_id, allow_patterns=[_escaped(f) for f in wanted]))


def _not_a_pipeline(repo_id: str) -> str:
    """Why a repository without model_index.json cannot be a --model, and what to pass instead."""
    from huggingface_hub import HfApi

    with contextlib.suppress(Exception):
        files = HfApi().list_repo_files(repo_id)
        weights = [f for f in files if f.endswith(".safetensors")]
        if any("lora" in f.lower() for f in weights) or "adapter_config.json" in files:
            return (f"{repo_id} holds LoRA weights ({', '.join(weights[:3])}), not a pipeline: pass it as "
                    f"--lora {repo_id} and its base model as --model")
        if len(weights) == 1 and "/" not in weights[0]:
            return (f"{repo_id} holds one checkpoint file ({weights[0]}), not a diffusers pipeline: download it "
                    f"(`hf download {repo_id} {weights[0]}`) and pass the file as --model with its base "
                    "pipeline as --config")
    return (f"{repo_id} has no model_index.json, so it is not a diffusers pipeline (a LoRA goes to --lora, a "
            "single-file checkpoint to --model FILE with --config BASE)")
