"""Export: merging the adapter into a standalone model, and GGUF for llama.cpp and Ollama."""
