"""Suite-wide guards: nothing may reach a model hub, whoever runs pytest and however.

scripts/test.sh exports the same variables; setting them here too keeps a bare `pytest` run offline.
They must be set before huggingface_hub is first imported, which is why this lives in the root conftest.
"""

import os

for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ.setdefault(name, "1")
os.environ.setdefault("MPLBACKEND", "Agg")
