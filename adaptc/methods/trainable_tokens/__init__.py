"""Trainable tokens: train a few rows of an embedding, leave the others frozen.

The adapter holds the chosen rows (``trainable_tokens_delta``, one per token index); the
layer's output takes them in place of the embedding's rows: a token listed is looked up
in the adapter's rows, every other token in the frozen weight. On a tied output head
(``lm_head`` sharing the input embedding's weight) the same rows replace the head's, so
the two stay in step. Merging writes the rows into a new weight. PEFT's
``TrainableTokensConfig`` (peft_type ``TRAINABLE_TOKENS``), and LoRA's
``trainable_token_indices``, which adds such rows beside a LoRA adapter.
"""

import adaptc.spec  # noqa: F401  (first: the spec package imports this method's spec module)
