"""Real models built on mha_jax's public attention; the core library never imports this package.

    bert   the BERT encoder of sentence-transformers' all-MiniLM-L6-v2 (Flax NNX), its HF weights,
           its tokenizer and sentence embeddings (needs `mha_jax[models]`: safetensors, tokenizers)

Each model is one file that reads top to bottom: config, layers, forward, weights.
"""
