"""LLMs behind one interface: `backends/` (transformers, vllm, anthropic, openai), the
versioned prompts (`prompts.py`), and the ask-until-parsed loop (`rounds.py`)."""
