"""Code vendored from llama.cpp; see README.md here."""
