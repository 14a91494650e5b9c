"""``python -m adaptc.demo``: LoRA fine-tuning of all-MiniLM-L6-v2 on a small topic set."""

from adaptc.demo.run import main

__all__ = ["main"]
