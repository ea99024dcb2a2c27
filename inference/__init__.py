"""Everything that serves a model: registry of GGUF files, the llama.cpp engine, the Chat tab."""
