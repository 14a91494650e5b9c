"""OFT: orthogonal finetuning, a block-diagonal orthogonal rotation of a layer's input.

``x ↦ W₀(R x)`` (the layer computes with ``W₀Rᵀ``) on ``nn.Linear`` and ``nn.Conv2d``,
as PEFT's ``OFTModel`` (its 3×3-convolution forward is fixed: see docs/methods/oft.md).
Merging multiplies the weight by ``Rᵀ``.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
