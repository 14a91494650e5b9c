"""BOFT: butterfly orthogonal finetuning, a butterfly product of block-diagonal orthogonal
rotations of a layer's input features and a scaling of its outputs.

The layer computes with ``diag(s)·W₀·Rᵀ`` on ``nn.Linear`` and ``nn.Conv2d``, as PEFT's
``BOFTModel``. Merging writes that weight (a new tensor).
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
