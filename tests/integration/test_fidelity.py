"""A LoRA the engine trains is, in ComfyUI, the model it was in training: checked against ComfyUI's own code.

For tiny FLUX.2 [klein] and [dev], written as ComfyUI single files, the engine caches a two-image dataset and
trains a LoRA on attention + MLP (4 steps at lr 1e-2: clearly not zero). ComfyUI (COMFYUI_DIR), in a process of its
own (comfyui_fidelity.py says how and why), loads the same files through its nodes. Compared, each with its limit:

(a) LoraLoaderModelOnly uses every key of the engine's LoRA file (no "lora key not loaded" in ComfyUI's log), and
    the weights ComfyUI patches equal base + the trained model's delta (peft's get_delta_weight), in BFL names;
(b) ComfyUI's denoiser (Flux2.extra_conds + apply_model), as the velocity (x - D) / sigma, equals the trained
    model's velocity for the same noisy latent and caption (each side encoding the caption itself), sigma 0.3,
    0.7 and 0.95: <= 1e-4;
(c) the cached prompt embedding equals ComfyUI's CLIPTextEncode output for the caption, from the same token ids
    ([dev]: tokenized by the engine from the file's own tekken_model): <= 1e-5;
(d) the cached latent equals ComfyUI's VAEEncode of the same image file (LoadImage): <= 1e-5;
(e) the engine's sample (training/sampling.py, diffusers' pipeline) equals ComfyUI's EmptyFlux2LatentImage +
    RandomNoise + Flux2Scheduler + euler sample with the same seed ([klein] CFG 4 against the empty prompt, [dev]
    FluxGuidance 4), compared as the final latent: <= 1e-4.
The "-edit" variants train an edit LoRA (every image with a `_ref` reference image): ComfyUI's side reads the
reference with LoadImage + VAEEncode and sets it with its ReferenceLatent node, so (b) and (e) compare the engine's
reference tokens and position ids with ComfyUI's reference-latent path, and (d) also the cached reference latent.
And, inside that ComfyUI process, the engine finds ComfyUI's bundled qwen25_tokenizer for a lone [klein] file and
makes the token ids ComfyUI's own KleinTokenizer makes.

The measured maxima are recorded per test (record_property) and printed as one table when the module ends.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
VARIANTS = ("klein", "dev", "klein-dora", "klein-lokr", "klein-loha", "klein-edit", "dev-edit")
# klein-X: lora.type=X on klein's files; X-edit: a LoRA trained on an edit dataset (reference images)
FAMILY = {variant: variant.split("-")[0] for variant in VARIANTS}
SIGMAS = (0.3, 0.7, 0.95)
RESOLUTION = 64                     # one 64 x 64 bucket: images are cached as they are, 4 x 4 latent tokens
CAPTIONS = ("zxq ring, an orange ring on grey", "zxq, a small blue square")
GUIDANCE = 4.0                      # [klein]: CFG scale against the empty prompt; [dev]: the embedded guidance
SAMPLE = {"seed": 1234, "steps": 8, "size": RESOLUTION, "cfg": GUIDANCE}
LIMITS = {"lora": 1e-6, "denoiser": 1e-4, "text": 1e-5, "latent": 1e-5, "sample": 1e-4}
MEASURED: dict[tuple[str, str], float] = {}
OVERRIDES: dict[str, list[str]] = {}  # what ComfyUI's side changed to fit the tiny models (comfyui_fidelity.py)


def _shim_torch_extras() -> None:
    """The engine imports peft and diffusers' VAE, which import torchvision: next to a CPU-only torch the CUDA
    torchvision wheel cannot load, so the launcher's shims apply on first import (as scripts/comfyui_env.sh
    arranges for .venv; a no-op where they are installed already or the libraries load)."""
    spec = importlib.util.spec_from_file_location("comfyui_launcher", HERE / "comfyui_launcher.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.install_import_hook()


if os.environ.get("COMFYUI_DIR"):  # otherwise conftest.py skips the module; nothing to prepare
    _shim_torch_extras()


def record(record_property, variant: str, what: str, value: float) -> None:
    MEASURED[variant, what] = value
    record_property(f"{variant}.{what}.max_abs_diff", value)
    assert value <= LIMITS[what], f"[{variant}] {what}: max abs diff {value:.3g} > {LIMITS[what]:g}"


@pytest.fixture(scope="module", autouse=True)
def table(request):
    """The measured maxima as one table at the end of the module: what the closing notes quote."""
    yield
    if not MEASURED:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["", "fidelity against ComfyUI (max abs diff, CPU fp32, tiny models):",
             f"  {'comparison':<10} {'limit':>8} " + " ".join(f"{v:>10}" for v in VARIANTS)]
    for what, limit in LIMITS.items():
        cells = [f"{MEASURED[v, what]:10.2e}" if (v, what) in MEASURED else f"{'-':>10}" for v in VARIANTS]
        lines.append(f"  {what:<10} {limit:8.0e} " + " ".join(cells))
    lines += [f"  ComfyUI side, [{v}]: {change}" for v, changes in OVERRIDES.items() for change in changes]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():  # meant to be seen
        for line in lines:
            reporter.write_line(line) if reporter else print(line)


# ---------------------------------------------------------------------------------------------- the engine's side
def _dataset(folder: Path, edit: bool = False) -> Path:
    """Two images with captions; for an edit dataset each with its reference `img<i>_ref.png` beside it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i, caption in enumerate(CAPTIONS):
        for name in (f"img{i}", f"img{i}_ref") if edit else (f"img{i}",):
            pixels = np.clip(np.cumsum(rng.normal(0, 12, (RESOLUTION, RESOLUTION, 3)), axis=1) + 128, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def _train(root: Path, variant: str, models: Path | None = None) -> SimpleNamespace:
    """Tiny single files (or those in `models`), a dataset, a trained LoRA, and the trained model rebuilt from the
    run's last checkpoint."""
    import torch
    from peft import set_peft_model_state_dict

    from flux2_lora_core.cache import cache_for_config
    from flux2_lora_core.checkpoints import find_checkpoints, read_checkpoint
    from flux2_lora_core.config import load_config
    from flux2_lora_core.models import load_tokenizer, load_transformer, load_vae, resolve_sources
    from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model
    from flux2_lora_core.training import trainer
    from flux2_lora_core.training.lora import add_lora

    family, kind = FAMILY[variant], (variant.split("-") + ["lora"])[1]
    edit = kind == "edit"
    kind = "lora" if edit else kind
    if models is None:
        models = root / "models"
        write_tiny_model(models, variant=family, fmt="comfyui")
    files = {part: models / name for part, name in COMFYUI_FILES[family].items()}
    overrides = [f"model.path={files['transformer']}", f"model.vae={files['vae']}",
                 f"model.text_encoder={files['text_encoder']}", f"data.path={_dataset(root / 'data', edit)}",
                 f"data.resolution={RESOLUTION}", "data.flip=false", f"cache.dir={root / 'cache'}",
                 f"output.dir={root / 'runs'}", f"output.name=fidelity-{variant}", "lora.rank=4",
                 "lora.targets=attention_mlp", "train.steps=4", "train.lr=1e-2", "sample.steps=2",
                 f"lora.type={kind}"]
    if family == "klein":  # the tiny Qwen3 vocabulary; [dev]'s tokenizer is read from its text-encoder file
        overrides.append(f"model.tokenizer={files['tokenizer']}")
    config = load_config(None, overrides)
    result = trainer.train(config)

    cpu, f32 = torch.device("cpu"), torch.float32
    model, _ = load_transformer(files["transformer"], dtype=f32, device=cpu)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, dropout=0.0, targets=config.lora.targets, seed=0,
             kind=config.lora.type)
    tensors, _ = read_checkpoint(find_checkpoints(result.run_dir)[-1])
    set_peft_model_state_dict(model, tensors["adapter"])
    model.eval()
    cache, _ = cache_for_config(config)
    sources = resolve_sources(files["transformer"], vae=files["vae"], text_encoder=files["text_encoder"],
                              tokenizer=config.model.tokenizer)
    return SimpleNamespace(variant=variant, family=family, edit=edit, root=root, files=files, config=config,
                           lora=result.lora_path,
                           model=model, base=base, cache=cache, index=[i.path for i in cache.items].index("img0.png"),
                           tokenizer=load_tokenizer(sources.tokenizer, sources.text_encoder), sources=sources,
                           vae=load_vae(files["vae"], dtype=f32, device=cpu))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs: dict = {}
    for variant in VARIANTS:   # klein-dora trains on klein's very files: ComfyUI finds one file per name
        models = runs[FAMILY[variant]].files["transformer"].parent.parent if "-" in variant else None
        runs[variant] = _train(tmp_path_factory.mktemp(f"fidelity-{variant}"), variant, models)
    return runs


def _noisy_latents(run) -> dict:
    """x_t = (1 - sigma) x0 + sigma noise of the cached image, one per sigma, seeded."""
    import torch

    x0 = run.cache.latent(run.index, RESOLUTION)[None]                                  # (1, 128, 4, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    return {f"x_t/{sigma}": ((1 - sigma) * x0 + sigma * noise).contiguous() for sigma in SIGMAS}


# ---------------------------------------------------------------------------------------------- ComfyUI's side
@pytest.fixture(scope="module")
def comfyui(trained, tmp_path_factory):
    """What ComfyUI makes of every run's files: (results.json, {variant: tensors})."""
    from safetensors.torch import load_file, save_file

    work = tmp_path_factory.mktemp("comfyui-side")
    request = {"variants": {}}
    for variant, run in trained.items():
        save_file(_noisy_latents(run), str(work / f"{variant}-inputs.safetensors"))
        request["variants"][variant] = {
            "transformer": str(run.files["transformer"]), "vae": str(run.files["vae"]),
            "text_encoder": str(run.files["text_encoder"]), "tokenizer": str(run.files["tokenizer"]),
            "lora": str(run.lora), "prompt": CAPTIONS[0], "image": str(run.root / "data" / "img0.png"),
            "inputs": str(work / f"{variant}-inputs.safetensors"), "sigmas": list(SIGMAS),
            "guidance": GUIDANCE if run.family == "dev" else None, "sample": SAMPLE, "family": run.family,
            "reference": str(run.root / "data" / "img0_ref.png") if run.edit else None}
    alone = work / "text_encoders" / trained["klein"].files["text_encoder"].name  # nothing beside it
    alone.parent.mkdir()
    shutil.copy(trained["klein"].files["text_encoder"], alone)
    request["bundled_tokenizer"] = {"text_encoder": str(alone), "prompt": CAPTIONS[0]}
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo root would shadow ComfyUI's nodes.py
    command = [sys.executable, str(HERE / "comfyui_fidelity.py"), os.environ["COMFYUI_DIR"],
               str(work / "request.json"), str(work)]
    # No time limit of its own: ~15 s here, and the suite's per-test guard (pytest-timeout) catches a hang.
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"ComfyUI's side failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}",
                    pytrace=False)
    results = json.loads((work / "results.json").read_text(encoding="utf-8"))
    OVERRIDES.update({variant: results[variant]["overrides"] for variant in trained})
    return results, {variant: load_file(str(work / f"{variant}.safetensors")) for variant in trained}


# ---------------------------------------------------------------------------------------------- (a) LoRA
@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_loads_every_lora_key_and_patches_base_plus_the_trained_delta(trained, comfyui, variant,
                                                                              record_property):
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from flux2_lora_core.lora_files.lora_keys import bfl_target
    from flux2_lora_core.models.single_file import transformer_to_bfl

    run, (results, tensors) = trained[variant], comfyui
    info, got = results[variant], tensors[variant]
    assert info["lora_warnings"] == [], info["lora_warnings"]
    keys = load_file(str(run.lora)).keys()       # ComfyUI-named LoRA/DoRA layers; diffusers-named LoKr/LoHa ones
    lora_layers = ({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
                   | {"diffusion_model." + bfl_target(k[len("transformer."):].rpartition(".")[0]).module
                      for k in keys if k.startswith("transformer.")})
    assert info["lora_patched_layers"] == len(lora_layers)          # every layer of the file patched

    expected = dict(run.base)                       # diffusers names, the base merged with the LoRA by peft itself
    with torch.no_grad():
        for name, module in run.model.named_modules():
            if isinstance(module, BaseTunerLayer):
                merged = copy.deepcopy(module)             # peft's merge: W + dW, or for DoRA m/||W + dW|| (W + dW)
                merged.merge(safe_merge=True)
                expected[f"{name}.weight"] = merged.get_base_layer().weight
    # ComfyUI holds the RMSNorm scales that BFL files call `.scale` as `.weight`.
    expected = {(k[:-len(".scale")] + ".weight" if k.endswith(".scale") else k): v
                for k, v in transformer_to_bfl(expected).items()}
    patched = {k[len("patched/"):]: v for k, v in got.items() if k.startswith("patched/")}
    assert patched.keys() == expected.keys()
    base = {(k[:-len(".scale")] + ".weight" if k.endswith(".scale") else k): v
            for k, v in transformer_to_bfl(run.base).items()}
    changed = {k for k in base if not torch.equal(patched[k], base[k])}
    assert changed == {k[len("diffusion_model."):] + ".weight" for k in lora_layers}  # the LoRA's layers, no other
    assert max((expected[k] - base[k]).abs().max().item() for k in changed) > 1e-3   # a delta worth comparing
    record(record_property, variant, "lora", max((patched[k] - expected[k]).abs().max().item() for k in expected))


# ---------------------------------------------------------------------------------------------- (b) denoiser
@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_denoiser_gives_the_trained_models_velocity(trained, comfyui, variant, record_property):
    import torch

    from flux2_lora_core.training.flow_matching import PositionIds, predict_velocity

    run, got = trained[variant], comfyui[1][variant]
    text = run.cache.text(run.index)[None]                                # (1, L, 96), as the transformer gets it
    refs = run.cache.references(run.index, RESOLUTION)                    # edit: (1, 128, 4, 4), the cached one
    assert (refs is not None) == run.edit
    refs = None if refs is None else refs[None]
    img_ids, txt_ids = PositionIds().get(4, 4, text.shape[1], "cpu", references=0 if refs is None else 1)
    guidance = GUIDANCE if run.family == "dev" else None
    worst, without = 0.0, float("inf")
    for sigma, x_t in zip(SIGMAS, _noisy_latents(run).values()):
        with torch.no_grad():
            velocity = predict_velocity(run.model, x_t, text, torch.tensor([sigma]), img_ids=img_ids,
                                        txt_ids=txt_ids, guidance=guidance, references=refs)
            if run.edit:   # the same without the reference: what the comparison tells apart
                alone = predict_velocity(run.model, x_t, text, torch.tensor([sigma]), img_ids=img_ids[:16],
                                         txt_ids=txt_ids, guidance=guidance)
        comfyui_velocity = (x_t - got[f"denoised/{sigma}"]) / sigma    # ComfyUI's CONST: D = x - sigma v
        worst = max(worst, (velocity - comfyui_velocity).abs().max().item())
        if run.edit:
            without = min(without, (alone - comfyui_velocity).abs().max().item())
    if run.edit:
        assert comfyui[0][variant]["reference_latents"] == 1 and without > 100 * LIMITS["denoiser"], without
    record(record_property, variant, "denoiser", worst)


# ---------------------------------------------------------------------------------------------- (c) prompts
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_prompt_embedding_is_comfyuis_text_encoding(trained, comfyui, variant, record_property):
    from flux2_lora_core.cache.encoding import tokenize_prompts

    run, (results, tensors) = trained[variant], comfyui
    got = tensors[variant]
    if run.family == "dev":  # no tokenizer folder was named: the engine read the file's own tekken_model
        assert run.sources.tokenizer == run.files["text_encoder"]
    batch = tokenize_prompts(run.tokenizer, [CAPTIONS[0]], family=run.family, mode="comfyui")
    assert batch.input_ids[0][:batch.keep[0]].tolist() == results[variant]["token_ids"]["prompt"]
    cached = run.cache.text(run.index)                                  # (512, 96): [dev] zero rows in front
    comfyui_text = got["text/prompt"][0]                                # (L, 96): [klein] 512, [dev] the prompt's
    rows = comfyui_text.shape[0]
    assert rows == batch.keep[0] and cached.shape[0] == 512
    assert not cached[:512 - rows].any()                                # ComfyUI's Flux2.extra_conds padding
    worst = max((cached[512 - rows:] - comfyui_text).abs().max().item(),
                (cached - got[f"c_crossattn/{SIGMAS[0]}"][0]).abs().max().item())  # as ComfyUI's model gets it
    record(record_property, variant, "text", worst)


# ---------------------------------------------------------------------------------------------- (d) latents
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_latent_is_comfyuis_vae_encoding(trained, comfyui, variant, record_property):
    run, got = trained[variant], comfyui[1][variant]
    assert run.cache.items[run.index].buckets[RESOLUTION] == (RESOLUTION, RESOLUTION)  # cached as it is on disk
    cached = run.cache.latent(run.index, RESOLUTION)                    # (128, 4, 4)
    worst = (cached - got["vae/latent"][0]).abs().max().item()
    if run.edit:                                                        # and the reference's, cached beside it
        worst = max(worst, (run.cache.references(run.index, RESOLUTION)[0] - got["vae/reference"][0]).abs().max().item())
    record(record_property, variant, "latent", worst)


# ---------------------------------------------------------------------------------------------- (e) sampling
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_sample_is_comfyuis_flux2_scheduler_euler_sample(trained, comfyui, variant, record_property):
    import torch

    from flux2_lora_core.training.sampling import sample_tokens

    run, got = trained[variant], comfyui[1][variant]
    (tokens,) = sample_tokens(run.model, run.vae, run.family, [run.cache.text(run.index)], run.cache.text(None),
                              size=SAMPLE["size"], steps=SAMPLE["steps"], guidance=GUIDANCE, seed=SAMPLE["seed"],
                              dtype=torch.float32,                      # (1, h*w, 128); edit: the reference image
                              references=[(run.root / "data" / "img0_ref.png",)] if run.edit else None)
    side = SAMPLE["size"] // 16
    latent = tokens.permute(0, 2, 1).reshape(1, 128, side, side)        # ComfyUI's (1, 128, h, w)
    assert got["sample/sigmas"].numel() == SAMPLE["steps"] + 1
    record(record_property, variant, "sample", (latent - got["sample/latent"]).abs().max().item())


# ---------------------------------------------------------------------------------------------- tokenizer inside
def test_inside_comfyui_a_lone_klein_file_gets_comfyuis_tokenizer(comfyui):
    found = comfyui[0]["bundled_tokenizer"]
    bundled = Path(os.environ["COMFYUI_DIR"]) / "comfy" / "text_encoders" / "qwen25_tokenizer"
    assert Path(found["found"]).resolve() == bundled.resolve()
    assert found["engine_ids"] == found["comfyui_ids"] and len(found["engine_ids"]) == 512
