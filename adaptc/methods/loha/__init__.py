"""LoHa: ``x ↦ W₀x + ΔW x`` with ``ΔW = (alpha/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` reshaped to
the weight's shape (for a convolution with ``use_effective_conv2d``, each factor rebuilt
from a core ``t1``/``t2``), on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` as PEFT's
``LoHaModel``. Merging adds ``ΔW`` to the weight.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
