"""LoRA: ``x ↦ W₀x + s·B·A·x`` on linear layers, convolutions and embeddings (DoRA a variant).

``spec`` (the spec model and PEFT's ``LoraConfig`` both ways), ``method`` (the registry
entry), ``rule`` and one module per layer kind (``linear``, ``conv``, ``embedding``), the
branch module (``branch``), its graph nodes (``emit``), inits (``init``) and variants
(``variants``, ``dora``).
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
