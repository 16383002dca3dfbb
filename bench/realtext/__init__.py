"""Real pretrained models and real-text quality: fetch/convert a GGUF once, build long prompts from Python's own
documentation, and measure what a compressed cache costs in perplexity, retrieval and agreement."""
