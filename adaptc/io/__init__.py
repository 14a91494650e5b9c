"""Adapters on disk: PEFT's file format in and out."""

from adaptc.adapters.keys import AdapterKeyError, adapter_state_dict
from adaptc.io.card import write_model_card
from adaptc.io.load import AdapterLoadError, load_adapter, load_adapter_into, resolve_adapter_dir
from adaptc.io.push import push_adapter
from adaptc.io.save import save_adapter
from adaptc.io.swap import hotswap

__all__ = [
    "AdapterKeyError",
    "AdapterLoadError",
    "adapter_state_dict",
    "hotswap",
    "load_adapter",
    "load_adapter_into",
    "push_adapter",
    "resolve_adapter_dir",
    "save_adapter",
    "write_model_card",
]
