"""Adapters on disk: PEFT's file format in and out."""

from adaptc.io.keys import AdapterKeyError, adapter_state_dict
from adaptc.io.load import AdapterLoadError, load_adapter, resolve_adapter_dir
from adaptc.io.save import save_adapter

__all__ = [
    "AdapterKeyError",
    "AdapterLoadError",
    "adapter_state_dict",
    "load_adapter",
    "resolve_adapter_dir",
    "save_adapter",
]
