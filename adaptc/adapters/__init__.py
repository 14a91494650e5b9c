"""Operations on a compiled model: switch, add and delete adapters, mixed batches, combine,
hotswap, and the adapter file's view of the model (``keys``).

They work on the state :func:`adaptc.compiler.compiled` returns and rebuild graphs with
:func:`adaptc.compiler.rebuild`; they never read files (``adaptc.io`` does).
"""

from adaptc.adapters.alora import activated, alora_adapters, invocation_offsets
from adaptc.adapters.combine import COMBINATION_TYPES, combine_adapters
from adaptc.adapters.hotswap import HotswapError, hotswap_tensors, is_prepared, prepare_hotswap
from adaptc.adapters.keys import AdapterKeyError, adapter_state_dict, adapter_tensors
from adaptc.adapters.manage import add_adapter, delete_adapter
from adaptc.adapters.mixed import MixedBatchError, adapter_ids, adapter_names, mixed_batch
from adaptc.adapters.switch import active_adapters, disabled, set_active, set_enabled

__all__ = [
    "COMBINATION_TYPES",
    "AdapterKeyError",
    "HotswapError",
    "MixedBatchError",
    "activated",
    "active_adapters",
    "adapter_ids",
    "adapter_names",
    "adapter_state_dict",
    "adapter_tensors",
    "add_adapter",
    "alora_adapters",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "hotswap_tensors",
    "invocation_offsets",
    "is_prepared",
    "mixed_batch",
    "prepare_hotswap",
    "set_active",
    "set_enabled",
]
