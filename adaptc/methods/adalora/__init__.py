"""AdaLoRA: SVD-form LoRA whose per-layer rank a budget schedule allocates while training.

``x ↦ W₀x + (dropout(x) @ (A⊙E)ᵀ @ Bᵀ)·lora_alpha/(init_r + 1e-5)`` on ``nn.Linear`` and
transformers' ``Conv1D``, as PEFT's ``AdaLoraModel``; an orthogonal regulariser is added
to the model's loss, and ``adaptc.integrations.update_and_allocate`` (or the
``AdaLoraCallback`` for transformers' ``Trainer``) masks the least important triplets.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
