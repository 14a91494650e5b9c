"""(IA)³: learned vectors that rescale a layer's output, or a feed-forward layer's input.

``x ↦ W₀x·l`` (``l``: one factor per output feature; the bias is scaled too) or, on a
layer listed in ``feedforward``, ``x ↦ W₀(x·l)`` (``l``: one factor per input feature),
on ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` and ``nn.Conv3d`` as PEFT's
``IA3Model`` does. Merging multiplies the weight (and, for output scaling, the bias).
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
