"""LoKr: ``x ↦ W₀x + ΔW x`` with ``ΔW = (alpha/r)·kron(w1, w2)`` reshaped to the weight's
shape, each factor full or a rank-``r`` product, the shapes from PEFT's ``factorization``
of the layer's sizes, on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` as PEFT's
``LoKrModel``. Merging adds ``ΔW`` to the weight.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
