"""Other libraries' trainers with adaptc models (see ``docs/training.md``)."""

from adaptc.integrations.transformers import adapted_model, load_in_place, patch_trainer

__all__ = ["adapted_model", "load_in_place", "patch_trainer"]
