"""A trained adapter into models/: merge, GGUF conversion, quantizing, install; and publishing to the Hub."""
