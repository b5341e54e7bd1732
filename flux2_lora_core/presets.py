"""`--preset` (and Configure LoRA's preset): starting points from the audit, applied under the user's file and
overrides. Plain values; config.py validates them like any other."""

PRESETS: dict[str, dict] = {
    # A person or character: identity lives in fine detail, so no flips (faces are not symmetric);
    # a small rank keeps the LoRA from memorising backgrounds.
    "character": {"lora": {"rank": 16, "alpha": 16.0}, "data": {"flip": False},
                  "train": {"steps": 1500, "lr": 1e-4, "caption_dropout": 0.05}},
    # A style touches every layer and every subject: more rank, flips, and caption dropout so the
    # style also appears without its trigger.
    "style": {"lora": {"rank": 32, "alpha": 32.0}, "data": {"flip": True},
              "train": {"steps": 2000, "lr": 1e-4, "caption_dropout": 0.1}},
    # An object or concept: between the two.
    "concept": {"lora": {"rank": 16, "alpha": 16.0}, "data": {"flip": True},
                "train": {"steps": 1200, "lr": 1e-4, "caption_dropout": 0.05}},
}
