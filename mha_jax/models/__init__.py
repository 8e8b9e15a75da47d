"""Real models built on mha_jax's public attention; the core library never imports this package.

    bert      the BERT encoder of sentence-transformers' all-MiniLM-L6-v2, its HF weights,
              its tokenizer and sentence embeddings
    llama     the Llama decoder of SmolLM2-135M-Instruct, from its GGUF; tokenizer, chat template
    gemma     Gemma 3 270M, from its GGUF: QK-norm, sliding-window local layers, two RoPE bases
    gpt_oss   gpt-oss from HF's state dict: sinks, sliding and full layers, YaRN, a mixture of experts
    sampling  the generation loop (prefill, then one cached step per token) the decoders share
    weights   named weights in and out of a model's NNX state, as device arrays

Each model is one file that reads top to bottom: config, layers, forward, weights.
"""
