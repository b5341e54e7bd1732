# Sourced by test.sh after env.sh: makes the real-server tests (tests/integration) runnable, so that they
# run rather than skip wherever a ComfyUI checkout is at hand.
#
#   COMFYUI_DIR   the ComfyUI checkout the tests start; when unset, ../shared/comfyui (the read-only
#                 snapshot CI has beside the project) if it exists. Empty or absent: the tests skip.
#
# ComfyUI's Python requirements go into the test environment with the installed torch held where it is
# (a bare `torch` in them would otherwise swap the CPU build for a CUDA one of several GB). The
# torchvision/torchaudio wheels that then resolve cannot load their compiled parts next to a CPU torch;
# tests/integration/comfyui_launcher.py shims exactly that, and is installed beside them with a .pth line
# so that every process in the environment gets its shims on first import: transformers imports
# torchvision whenever it is installed, so without them the engine itself would fail to import there.
# comfyui-workflow-templates is left out: it is
# the frontend's template gallery (hundreds of MB of media), which the server serves without and no test
# opens. Nothing is ever written into the checkout itself.
if [ -z "${COMFYUI_DIR+set}" ] && [ -f ../shared/comfyui/main.py ]; then
    COMFYUI_DIR="$(cd ../shared/comfyui && pwd)"
fi
export COMFYUI_DIR="${COMFYUI_DIR:-}"

if [ -n "$COMFYUI_DIR" ] && [ -f "$COMFYUI_DIR/requirements.txt" ]; then
    comfy_stamp="$venv/.comfyui-requirements"
    comfy_shims=tests/integration/comfyui_launcher.py
    comfy_want="$(cat "$COMFYUI_DIR/requirements.txt" pyproject.toml scripts/comfyui_env.sh "$comfy_shims" \
                  | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$comfy_stamp" 2>/dev/null)" != "$comfy_want" ]; then
        echo "installing ComfyUI's requirements from $COMFYUI_DIR (torch kept as it is)"
        comfy_tmp="$(mktemp -d)"
        "$py" -c 'import torch; print("torch==" + torch.__version__)' > "$comfy_tmp/constraints.txt"
        grep -v -i -E '^[[:space:]]*comfyui-workflow-templates' "$COMFYUI_DIR/requirements.txt" \
            > "$comfy_tmp/requirements.txt"
        "$py" -m pip install --quiet --disable-pip-version-check \
            -r "$comfy_tmp/requirements.txt" -c "$comfy_tmp/constraints.txt"
        rm -rf "$comfy_tmp"
        comfy_site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        cp "$comfy_shims" "$comfy_site/flux2_lora_test_shims.py"
        echo "import flux2_lora_test_shims; flux2_lora_test_shims.install_import_hook()" \
            > "$comfy_site/flux2_lora_test_shims.pth"
        echo "$comfy_want" > "$comfy_stamp"
    fi
    # From here on a skipped real-server test is a broken setup, not a choice: the suite says so and stops.
    export FLUX2_LORA_REQUIRE_COMFYUI=1
fi
