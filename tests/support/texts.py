"""Held-out text: prose no fine-tune data contains, for perplexity and logit checks (offline)."""
from __future__ import annotations


def held_out_text() -> str:
    """Python's language reference topics (pydoc_data): English prose with code, offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
