# Sourced by test.sh and demo.sh: on a fresh machine, create the virtual environment and install torch
# and this package; later runs reuse it and reinstall only when pyproject.toml changed. Sets $py.
#
#   FLUX2_LORA_TORCH   torch requirement to install when none is importable (default torch==2.13.0,
#                      which is a local CPU build on the CI box; a bare `torch` would pull CUDA)
#   FLUX2_LORA_VENV    where the virtual environment lives (default .venv)
#   extras             the package extras to install, set by the caller (test: "test", demo: "")
venv="${FLUX2_LORA_VENV:-.venv}"
torch_spec="${FLUX2_LORA_TORCH:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "installing $torch_spec"
    "$py" -m pip install --quiet --disable-pip-version-check "$torch_spec"
fi

stamp="$venv/.flux2-lora-installed${extras:+-$extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing comfyui-flux2-lora${extras:+ with its $extras extras}"
    "$py" -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
    echo "$want" > "$stamp"
fi

# Nothing may come from a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 MPLBACKEND=Agg
