"""Training: the recipe (trainer: setup, train loop, save) over the flow-matching math, peft LoRA, samples, metrics,
the learning-rate range test and the state a checkpoint captures. Above cache/, checkpoints/ and lora_files/."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "callbacks": ("PHASES", "Callbacks", "StepReport"),
    "distributed": ("Team", "follower", "join", "leave"),
    "ema": ("ema_lora_path",),
    "lr_finder": ("run_range_test",),
    "memory_plan": ("SPEED_ORDER", "format_plan", "plan_for_variant", "plan_memory", "settings_summary"),
    "metrics": ("read_metrics",),
    "model_fit": ("gpu_memory_gib", "model_note"),
    "run_folder": ("cluster_command", "new_run_dir"),
    "trainer": ("TrainingResult", "train"),
})
