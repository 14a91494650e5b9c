"""Prompt tuning: learned virtual tokens prepended to the input embeddings.

The adapter holds ``num_virtual_tokens`` embedding vectors (PEFT's ``prompt_embeddings``);
every forward that starts a sequence puts them before the embedded input, extends the
attention mask with ones and the labels with -100. The base model is frozen and unchanged.
PEFT's ``PromptTuningConfig`` (peft_type ``PROMPT_TUNING``). Nothing to merge.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
