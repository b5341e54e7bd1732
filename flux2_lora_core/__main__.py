"""`python -m flux2_lora_core` is `flux2-lora`, for installs whose console scripts are not on PATH."""

import sys

from .cli import main

sys.exit(main())
