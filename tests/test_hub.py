"""From a hub id to a ranking, against a stand-in for the Hugging Face hub on 127.0.0.1 (tests/fake_hub.py)
serving tiny pipelines laid out like the real repositories (tests/hub_repos.py). The CLI runs in
subprocesses whose HF_ENDPOINT points at the stand-in: one process for the online cases, one with
HF_HUB_OFFLINE=1 (tests/cli_cases.py runs several CLI calls per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import hub_repos
from .conftest import CLASSES, random_images

ROOT = Path(__file__).resolve().parent.parent
NOT_LOADED = (".bin", ".onnx", ".onnx_data", ".msgpack", ".xml")


def expected_files(repo: Path, half: bool = False) -> set[str]:
    """What loading the pipeline must fetch, by the rule users expect (written apart from hub.py): model_index.json
    and every file of the folders it names, weights as safetensors in one variant (fp16 for half-precision
    scoring where the folder has it; a folder with only fp16 files gives those)."""
    index = json.loads((repo / "model_index.json").read_text())
    named = {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0]}
    wanted = {"model_index.json"}
    for folder in named:
        names = [p.name for p in (repo / folder).iterdir()]
        has_full = any(n.endswith(".safetensors") and ".fp16" not in n for n in names)
        want_fp16 = (half and any(".fp16" in n for n in names)) or not has_full
        for name in names:
            if name.endswith(NOT_LOADED):
                continue
            if (name.endswith(".safetensors") or ".safetensors.index" in name) and (".fp16" in name) != want_fp16:
                continue
            wanted.add(f"{folder}/{name}")
    return wanted


def fetched(result: dict, repo_id: str) -> set[str]:
    """The files of `repo_id` a case downloaded (one request per distinct content: the hub client links files with
    the same content to one blob, as real repositories' identical tokenizer files are)."""
    return {line.split(" ", 1)[1] for line in result["fetched"] if line.split(" ", 1)[0] == repo_id}


def snapshot(result: dict, repo_id: str) -> set[str]:
    """Every file of `repo_id` in the case's hub cache: what a loader finds on disk."""
    folder = Path(result["hub_cache"]) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.relative_to(commit).as_posix() for commit in folder.iterdir() for p in commit.rglob("*") if p.is_file()}


def fetched_exactly(result: dict, repo_id: str, wanted: set[str]) -> None:
    assert snapshot(result, repo_id) == wanted
    assert fetched(result, repo_id) <= wanted


def one_line_error(result: dict) -> str:
    """The error of a failed case: exit code 2, no traceback, and the error on one line."""
    assert result["code"] == 2, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("diffusion-classifier: error:")]
    assert len(errors) == 1, result["stderr"]
    return errors[0]


def make_sd_lora(pipeline_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA for the tiny SD UNet in diffusers' own format (random A and B, so it changes the outputs)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet))
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    repos = hub_repos.build_hub(root / "repos")
    lora = make_sd_lora(repos["sd2"], tmp_path_factory.mktemp("lora"))
    repos["lora"] = hub_repos.lora_repo(root / "repos", lora)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_hub.py")), str(root / "repos"),
                               "--lifetime", "900"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        image = root / "image.png"
        random_images(1, size=20)[0].save(image)
        yield {"root": root, "repos": repos, "port": port, "image": str(image), "lora_file": lora,
               "log": root / "repos" / "requests.log"}
    finally:
        server.kill()  # by its PID; it would also end by itself after --lifetime
        server.wait(timeout=30)


def run_cases(hub, cases: dict[str, dict], offline: bool = False) -> dict[str, dict]:
    """Run named CLI cases in one subprocess pointed at the stand-in hub."""
    root = hub["root"]
    tag = "offline" if offline else "online"
    case_file, out_file = root / f"{tag}_cases.json", root / f"{tag}_results.json"
    case_file.write_text(json.dumps(list(cases.values())))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{hub['port']}", HF_HOME=str(root / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", FAKE_HUB_LOG=str(hub["log"]), PYTHONPATH=str(ROOT / "src"))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("cli_cases.py")), str(case_file),
                           str(out_file)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out_file.read_text())
    for case, result in zip(cases.values(), results):
        result["hub_cache"] = case["hub_cache"]
    return dict(zip(cases, results))


def classify(hub, repo_id: str, *extra: str, cache: str, labels: bool = True, env: dict | None = None) -> dict:
    argv = ["classify", hub["image"], "--model", repo_id, "--device", "cpu", "--timesteps", "2", "--json", *extra]
    if labels:
        argv += ["--labels", "cat,dog"]
    return {"argv": argv, "hub_cache": str(hub["root"] / "caches" / cache), "env": env or {}}


@pytest.fixture(scope="module")
def online(hub):
    gated_env = {"HF_TOKEN": hub_repos.GATED_TOKEN}
    cases = {
        "sd2": classify(hub, hub_repos.SD2, cache="sd2"),
        "sd2_lora": classify(hub, hub_repos.SD2, "--lora", "someone/tiny-sd-lora", cache="sd2"),
        "sd2_fp16": classify(hub, hub_repos.SD2, "--dtype", "float16", cache="sd2_fp16"),
        "sdxl": classify(hub, hub_repos.SDXL, cache="sdxl"),
        "sd35": classify(hub, hub_repos.SD35, cache="sd35", env=gated_env),
        "flux": classify(hub, hub_repos.FLUX, cache="flux"),
        "dit": classify(hub, hub_repos.DIT, cache="dit", labels=False),
        "fp16_only": classify(hub, "someone/sd-fp16-only", cache="fp16_only"),
        "gated": classify(hub, hub_repos.SD35, cache="gated"),
        "missing": classify(hub, "someone/no-such-model", cache="missing"),
        "lora_as_model": classify(hub, "someone/tiny-sd-lora", cache="lora_as_model"),
        "estimate": {"argv": ["estimate", "--model", hub_repos.SDXL, "--memory", "1GB", "--json"],
                     "hub_cache": str(hub["root"] / "caches" / "estimate"), "env": {}},
    }
    return run_cases(hub, cases)


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd35", "flux", "dit"])
def test_each_family_classifies_from_its_hub_id_fetching_only_what_it_loads(hub, online, family):
    result = online[family]
    assert result["code"] == 0, result["stderr"]
    prediction = json.loads(result["stdout"].splitlines()[-1])["prediction"]
    assert prediction in (CLASSES if family == "dit" else ["cat", "dog"])
    repo = hub["repos"][family]
    repo_id = repo.relative_to(hub["root"] / "repos").as_posix()
    fetched_exactly(result, repo_id, expected_files(repo))


def test_the_downloads_hold_what_the_old_patterns_missed_and_nothing_else(online):
    sdxl, sd35, flux = (snapshot(online[k], repo) for k, repo in (("sdxl", hub_repos.SDXL), ("sd35", hub_repos.SD35),
                                                                  ("flux", hub_repos.FLUX)))
    assert {"tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json"} <= sdxl
    assert "text_encoder_3/model.safetensors.index.json" in sd35 and "tokenizer_3/tokenizer.json" in sd35
    assert {"transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder_2/model.safetensors.index.json"} <= flux
    every = sdxl | sd35 | flux
    assert not [f for f in every if f.startswith(("vae_1_0/", "text_encoders/", "vae_decoder/")) or "/" not in f
                and f != "model_index.json"]
    assert not [f for f in every if ".fp16." in f or f.endswith(NOT_LOADED)]


def test_half_precision_fetches_the_fp16_variant_alone(hub, online):
    result = online["sd2_fp16"]
    assert result["code"] == 0, result["stderr"]
    fetched_exactly(result, hub_repos.SD2, expected_files(hub["repos"]["sd2"], half=True))


def test_a_repository_with_only_fp16_files_loads(hub, online):
    result = online["fp16_only"]
    assert result["code"] == 0, result["stderr"]
    fetched_exactly(result, "someone/sd-fp16-only", expected_files(hub["repos"]["fp16_only"]))


def test_hub_errors_are_one_line_that_says_what_to_do(online):
    gated = one_line_error(online["gated"])
    assert "gated" in gated and "accept its licence" in gated and "huggingface-cli login" in gated
    assert "HF_TOKEN" in gated
    assert "was not found on the Hugging Face hub" in one_line_error(online["missing"])
    lora = one_line_error(online["lora_as_model"])
    assert "LoRA" in lora and "--lora someone/tiny-sd-lora" in lora


def test_a_lora_from_the_hub_changes_the_ranking_scores(online):
    assert online["sd2_lora"]["code"] == 0, online["sd2_lora"]["stderr"]
    base, tuned = (json.loads(online[k]["stdout"].splitlines()[-1])["ranking"] for k in ("sd2", "sd2_lora"))
    assert {r["label"]: r["score"] for r in base} != {r["label"]: r["score"] for r in tuned}
    assert fetched(online["sd2_lora"], "someone/tiny-sd-lora") == {"pytorch_lora_weights.safetensors"}


def test_offline_uses_the_cache_or_says_how_to_fill_it(hub, online):
    assert online["sd2"]["code"] == 0
    results = run_cases(hub, {"cached": classify(hub, hub_repos.SD2, cache="sd2"),
                              "empty": classify(hub, hub_repos.SDXL, cache="offline_empty")}, offline=True)
    assert results["cached"]["code"] == 0, results["cached"]["stderr"]
    assert results["cached"]["fetched"] == []
    assert json.loads(results["cached"]["stdout"].splitlines()[-1])["ranking"] == \
        json.loads(online["sd2"]["stdout"].splitlines()[-1])["ranking"]
    assert "HF_HUB_OFFLINE" in one_line_error(results["empty"])


def test_estimate_fetches_configs_and_tokenizers_but_no_weights(hub, online):
    result = online["estimate"]
    assert result["code"] == 0, result["stderr"]
    assert json.loads(result["stdout"])["max_batch_size"] > 0
    files = snapshot(result, hub_repos.SDXL)
    assert files == {f for f in expected_files(hub["repos"]["sdxl"]) if not f.endswith(".safetensors")}
    assert "tokenizer_2/vocab.json" in files and "unet/config.json" in files
