"""Other libraries' trainers with adaptc models (see ``docs/training.md``)."""

from adaptc.integrations import adalora as _adalora
from adaptc.integrations.adalora import update_and_allocate
from adaptc.integrations.transformers import adapted_model, load_in_place, patch_trainer

__all__ = [
    "AdaLoraCallback",
    "adapted_model",
    "load_in_place",
    "patch_trainer",
    "update_and_allocate",
]


def __getattr__(name: str) -> object:
    # AdaLoRA's callback is made on first use (it imports transformers' trainer_callback)
    if name == "AdaLoraCallback":
        return _adalora.AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
