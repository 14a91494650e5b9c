"""VeRA: ``x ↦ W₀x + b ⊙ B(d ⊙ A x)``, with ``A`` (r, in) and ``B`` (out, r) frozen random
projections shared by all of an adapter's targets (drawn from ``projection_prng_key``,
sized for the largest layer and sliced per layer) and trained vectors ``d`` (r) and ``b``
(out) per target, on ``nn.Linear`` and transformers' ``Conv1D`` as PEFT's ``VeraModel``.
Merging adds ``(b ⊙ B)(d ⊙ A)`` to the weight.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
