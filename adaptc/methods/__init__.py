"""Adapter methods: each lives in its own package here and is registered by name below.

A method package holds two modules the rest of adaptc reads:

- ``spec.py`` (the spec layer; imports nothing above :mod:`adaptc.spec`): ``SPEC``, a
  :class:`adaptc.spec.method.MethodSpec` with the method's pydantic model (the spec's
  adapter union is discriminated by ``method``) and its PEFT config conversion both ways;
- ``method.py``: ``METHOD``, an :class:`adaptc.methods.base.Method` with its plan
  entries, branch modules and emit, merge rule and on-disk tensors.

Adding a method is a new package and one entry in :data:`NAMES` (docs/development.md).
"""

# the registration: package names, in schema order
NAMES: tuple[str, ...] = (
    "lora",
    "ia3",
    "trainable_tokens",
    "loha",
    "lokr",
    "vera",
    "oft",
    "boft",
    "adalora",
    "prompt_tuning",
)
