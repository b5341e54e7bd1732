"""models/streaming.py: single files load layer by layer, bit-identical to the whole-file path, in bounded RAM.

The reference is the whole-file path the loaders used before streaming (read every tensor, convert the
dict, `from_single_file` / `load_state_dict`), kept here as the oracle. The memory test runs in a
subprocess so that its peak resident set is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_lora_core.models.files import TRANSFORMER_PREFIXES, VAE_PREFIXES, load_tensors, read_header
from flux2_lora_core.models.loading import _transformer_from_file, load_vae
from flux2_lora_core.models.text_encoder_loading import _language_model_state, _text_encoder_weights
from flux2_lora_core.models.quantization import dequantize, to_fp8r
from flux2_lora_core.models.single_file import vae_to_diffusers
from flux2_lora_core.models.streaming import group_of
from flux2_lora_core.models.tiny_models import write_tiny_model
from flux2_lora_core.models.variants import shipped_config, text_encoder_config_from_shapes, vae_config_from_shapes

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------------- the old path
def whole_file_transformer(path: Path, dtype: torch.dtype):
    """The pre-streaming loader: every tensor in RAM, converted as one dict, then `from_single_file`."""
    from diffusers import BFLQuantizationConfig, Flux2Transformer2DModel

    from flux2_lora_core.models.quantization import logical_shapes
    from flux2_lora_core.models.variants import detect_variant

    file = read_header(path, key="model.path")
    prefix, shapes = file.select(TRANSFORMER_PREFIXES)
    dtypes = {k[len(prefix):]: v for k, v in file.dtypes.items() if k.startswith(prefix)}
    variant = detect_variant(logical_shapes(shapes, dtypes), source=str(path))
    state, scheme = to_fp8r(load_tensors(file, prefix), file.metadata, path=path, prefix=prefix)
    quantization = BFLQuantizationConfig(compute_dtype=dtype) if scheme else None
    with tempfile.TemporaryDirectory() as config_dir:
        config = {"_class_name": "Flux2Transformer2DModel", **variant.transformer_config}
        Path(config_dir, "config.json").write_text(json.dumps(config), encoding="utf-8")
        return Flux2Transformer2DModel.from_single_file(state, config=config_dir, local_files_only=True,
                                                        torch_dtype=dtype, device=CPU,
                                                        quantization_config=quantization)


def whole_file_vae(path: Path, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2

    file = read_header(path, key="model.vae")
    prefix, shapes = file.select(VAE_PREFIXES)
    state = vae_to_diffusers(dequantize(load_tensors(file, prefix), file.metadata, dtype=dtype, path=path,
                                        prefix=prefix))
    with init_empty_weights(include_buffers=False):
        model = AutoencoderKLFlux2.from_config(vae_config_from_shapes(shapes))
    state = {k: v.to(dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    return model


def whole_file_text_state(path: Path, family: str, dtype: torch.dtype) -> dict:
    file = read_header(path, key="model.text_encoder")
    state = {k: v for k, v in load_tensors(file).items() if k not in ("tekken_model",)}
    return _language_model_state(dequantize(state, file.metadata, dtype=dtype, path=path), family, path)


def full_state(model: torch.nn.Module) -> dict:
    """state_dict plus the fp8 scales diffusers' BFL Linears keep as plain attributes."""
    out = dict(model.state_dict())
    for name, module in model.named_modules():
        for attr in ("weight_scale", "weight_scale_2", "input_scale"):
            if isinstance(getattr(module, attr, None), torch.Tensor):
                out[f"{name}.{attr}"] = getattr(module, attr)
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key


# ---------------------------------------------------------------------------------------------- identity
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    out = {}
    for variant in ("klein", "dev"):
        files = write_tiny_model(tmp_path_factory.mktemp(variant), variant, fmt="comfyui")
        out[variant] = {f.parent.name: f for f in files}
    return out


@pytest.mark.parametrize("variant", ["klein", "dev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_components_equal_the_whole_file_path_bit_for_bit(comfy, variant, dtype):
    files = comfy[variant]
    streamed, _ = _transformer_from_file(files["diffusion_models"], "auto", dtype, CPU)
    assert_bit_identical(full_state(streamed), full_state(whole_file_transformer(files["diffusion_models"], dtype)))
    assert_bit_identical(load_vae(files["vae"], dtype=dtype, device=CPU).state_dict(),
                         whole_file_vae(files["vae"], dtype).state_dict())
    family = variant
    config, states = _text_encoder_weights(files["text_encoders"], family, dtype)
    got = {}
    for state in states:
        got.update(state)
    expected = whole_file_text_state(files["text_encoders"], family, dtype)
    assert_bit_identical(got, expected)
    shapes = {f"model.{k}": tuple(v.shape) for k, v in expected.items()}
    assert config.to_dict() == text_encoder_config_from_shapes(shapes, family).to_dict()


@pytest.mark.parametrize("layout", ["bfl_fp8r", "comfy_scaled_fp8", "comfy_mixed_metadata", "bfl_nvfp4"])
def test_quantized_files_stream_into_the_same_fp8_layers(comfy, tmp_path, layout):
    import importlib.util  # test_loading's quantized layouts (pytest imports tests by path, not as a package)

    spec = importlib.util.spec_from_file_location("_layouts", Path(__file__).with_name("test_loading.py"))
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)
    tensors, metadata, _ = layouts._quantized(load_file(comfy["dev"]["diffusion_models"]), layout)
    save_file(tensors, tmp_path / "q.safetensors", metadata=metadata)
    streamed, _ = _transformer_from_file(tmp_path / "q.safetensors", "auto", torch.float32, CPU)
    reference = whole_file_transformer(tmp_path / "q.safetensors", torch.float32)
    assert [type(m).__name__ for m in streamed.modules()] == [type(m).__name__ for m in reference.modules()]
    assert any("BFL" in type(m).__name__ for m in streamed.modules())
    assert_bit_identical(full_state(streamed), full_state(reference))


def test_groups_are_layers():
    assert group_of("double_blocks.0.img_attn.qkv.weight") == "double_blocks.0.img_attn.qkv"
    assert group_of("img_in.comfy_quant") == group_of("img_in.weight_scale") == "img_in"
    assert group_of("tekken_model") == "tekken_model"


# ---------------------------------------------------------------------------------------------- memory
# Run in a fresh interpreter: `python -c _MEASURE <file> <new|old> <repo> <tests dir> <dtype>` prints the peak
# resident-set growth while loading (VmHWM after, less VmRSS before, in bytes) and the model's weight bytes.
_MEASURE = textwrap.dedent("""
    import ctypes, gc, sys, torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from flux2_lora_core.models.loading import _transformer_from_file

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    path, mode = Path(sys.argv[1]), sys.argv[2]
    # Import up front what loading imports lazily: module code is a fixed cost, not a function of the file.
    import accelerate, diffusers.loaders.single_file_utils, diffusers.models.model_loading_utils  # noqa: E401
    from diffusers import Flux2Transformer2DModel  # noqa: F401
    if mode == "old":
        sys.path.insert(0, sys.argv[4])
        from test_streamed_loading import whole_file_transformer
    for name in sys.argv[5].split(","):
        dtype = getattr(torch, name)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next baseline is honest
        before = rss("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
        if mode == "old":
            model = whole_file_transformer(path, dtype)
        else:  # "new", or a model.quantization to apply while loading
            model, _ = _transformer_from_file(path, "auto", dtype, torch.device("cpu"),
                                              "none" if mode == "new" else mode)
        print(name, rss("VmHWM:") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
        del model
""")



def write_wide_transformer(path: Path) -> tuple[int, int]:
    """A FLUX.2 transformer single file (BFL names, bf16) of [klein] width-class layers but 1 double and 2
    single blocks: ~340 MB. Returns (file size, largest tensor's bytes)."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_core.models.single_file import transformer_to_bfl

    config = {**shipped_config("flux2-klein-4b", "transformer"), "num_layers": 1, "num_single_layers": 2,
              "num_attention_heads": 12}  # width 1536 (klein 4B: 3072), its 7680-wide text input
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.empty(v.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
             for k, v in model.state_dict().items()}
    state = transformer_to_bfl(state)
    save_file(state, path)
    return path.stat().st_size, max(t.numel() * t.element_size() for t in state.values())


def measure(path: Path, mode: str, dtypes: str = "bfloat16", env=None) -> dict[str, tuple[int, int]]:
    """{dtype: (peak RSS growth while loading, model weight bytes)}, loading `path` the `mode` way (new: this
    package, old: the whole-file path) in one fresh process, once per comma-separated dtype."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode, str(ROOT), str(Path(__file__).parent),
                           dtypes], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "", **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in dtypes]
    return {name: (int(growth), int(size)) for name, growth, size in lines}


def test_peak_memory_is_the_model_plus_a_layer_or_two_not_file_plus_model(tmp_path):
    size, largest = write_wide_transformer(tmp_path / "wide.safetensors")
    assert size > 300 * 2**20
    measured = measure(tmp_path / "wide.safetensors", "new", "bfloat16,float32")
    for dtype, widen in (("bfloat16", 1), ("float32", 2)):
        growth, model_bytes = measured[dtype]
        print(f"{dtype}: file {size / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, model "
              f"{model_bytes / 2**20:.0f} MiB, peak RSS growth while loading {growth / 2**20:.0f} MiB")
        assert model_bytes > 0.95 * widen * size
        # The model itself is unavoidable; streaming adds a layer or two in flight (its bf16 copy and, when
        # widening, its cast). The whole-file path held the file and the model: 1040 MiB here in float32.
        assert growth < model_bytes + 2 * widen * largest + 32 * 2**20


def test_quantizing_while_streaming_never_holds_the_full_precision_base(tmp_path):
    """model.quantization applies layer by layer as a single file loads: a bf16 [dev] never has to fit the device
    whole. Peak growth loading into fp32 with int8 blocks stays well under the fp32 model alone."""
    size, largest = write_wide_transformer(tmp_path / "wide.safetensors")
    # Every allocation over 64 KiB its own mapping, handed back when freed: the resident set then follows what
    # torch holds, not where glibc's heap happened to keep the freed fp32 layers (517-702 MiB without this).
    (growth, quantized_bytes), = measure(tmp_path / "wide.safetensors", "int8", "float32",
                                        env={"MALLOC_MMAP_THRESHOLD_": "65536"}).values()
    full = 2 * size   # the fp32 model's bytes: the file is bf16
    print(f"int8 while loading: peak RSS growth {growth / 2**20:.0f} MiB, quantized model "
          f"{quantized_bytes / 2**20:.0f} MiB, fp32 model {full / 2**20:.0f} MiB")
    assert quantized_bytes < 0.5 * full
    # a layer in flight at fp32 plus quantize()'s fp32 temporaries of it (measured: 517 MiB growth for a 327 MiB
    # int8 model whose largest layer is 80 MiB in fp32); the fp32 base alone would be 678 MiB
    assert growth < quantized_bytes + 6 * largest + 32 * 2**20 and growth < 0.85 * full


def test_a_streamed_quantized_load_equals_quantizing_after_the_load(comfy):
    from flux2_lora_core.models.loading import load_transformer
    from flux2_lora_core.models.quantized_linear import QuantizedLinear, quantize_transformer

    path = comfy["klein"]["diffusion_models"]
    streamed, _ = load_transformer(path, dtype=torch.float32, device=CPU, quantization="nf4")
    after = quantize_transformer(whole_file_transformer(path, torch.float32), "nf4", dtype=torch.float32)
    assert sum(isinstance(m, QuantizedLinear) for m in streamed.modules()) > 0
    assert [type(m).__name__ for m in streamed.modules()] == [type(m).__name__ for m in after.modules()]
    assert_bit_identical(full_state(streamed), full_state(after))


@pytest.mark.parametrize("scheme", ["fp8", "int8", "nf4"])
def test_a_quantized_diffusers_folder_streams_its_shards_bit_identically(tmp_path, scheme):
    """from_pretrained would put the whole bf16 base on the device before quantizing it; the folder's shards are
    read layer by layer instead, each group quantized as it lands, to the same tensors."""
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_core.models.loading import load_transformer
    from flux2_lora_core.models.quantized_linear import quantize_transformer

    write_tiny_model(tmp_path, "klein")
    streamed, _ = load_transformer(tmp_path, dtype=torch.float32, device=CPU, quantization=scheme)
    whole = Flux2Transformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.float32)
    assert_bit_identical(full_state(streamed), full_state(quantize_transformer(whole, scheme, dtype=torch.float32)))
