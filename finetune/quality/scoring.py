"""Scoring an open llama.cpp model: many token sequences decoded together, text cut into
windows, next-token log-probabilities, and chat prompts in the GGUF's own template. Shared by
the gate's recall and its forgetting check.
"""
from __future__ import annotations

import ctypes

from finetune import FinetuneError

MAX_SEQUENCES = 32  # sequences scored together: their cells share one context
SEQ_IDS = 3 * MAX_SEQUENCES  # ids for them and their shared beginnings (a stem adds <= 2)


class _Node:
    """A run of tokens in the prefix tree of a group of sequences: decoded once, in a
    sequence id of its own, after its parent's cells are copied to that id."""

    def __init__(self, parent: "_Node | None", start: int):
        self.parent, self.start, self.tokens, self.children = parent, start, [], {}
        self.seq_id, self.leaf = -1, None  # leaf: (index of the sequence, first wanted pos)


class Scorer:
    """A llama.cpp context of its own on an open Llama's model (and LoRA adapter) that
    teacher-forces many token sequences at once, the way llama-server's parallel slots share
    a batch: sequences that begin alike (the same system prompt, the same question before
    different answers) decode their common beginning once and share its KV cells
    (llama_memory_seq_cp), the rest of each decodes in the same batches as the others, and
    logits are computed only for the positions asked for."""

    def __init__(self, llm, n_ctx: int, n_batch: int = 512):
        import llama_cpp

        from inference.cpu_threads import cpu_threads
        from inference.engine import flash_attn
        from inference.settings import Settings

        self._ll, self.llm = llama_cpp, llm
        self.n_batch = n_batch
        self.n_ctx = max(n_ctx, 4 * n_batch)  # cells of a group's sequences together
        self.max_tokens = n_ctx  # of one sequence
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = self.n_ctx, SEQ_IDS, True
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = cpu_threads()
        params.no_perf = True
        flash = flash_attn(Settings.from_env())  # as the chat engine will serve it
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash is None
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise FinetuneError(f"llama.cpp could not create a {self.n_ctx}-token scoring "
                                "context: out of memory?")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(
            llm._model.model))
        adapter = getattr(llm, "_lora_adapter", None)
        if adapter is not None:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(llm.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx, handles, 1, scales) != 0:
                self.close()
                raise FinetuneError("llama.cpp could not apply the LoRA adapter to score it.")

    def score(self, sequences: list[tuple[list[int], int]], reduce) -> list:
        """For each (token ids, first): `reduce(logits, targets)` of the raw next-token logits
        that predict ids[first:] (float32 rows, in order) and those targets. Sequences are
        cut to the context the Scorer was made for; first >= 1."""
        order = sorted(range(len(sequences)), key=lambda i: sequences[i][0])
        out: list = [None] * len(sequences)
        while order:
            group, cells, previous = [], 0, []
            while order and len(group) < MAX_SEQUENCES:
                ids, first = sequences[order[0]]
                ids = ids[:self.max_tokens]
                stem = ids[:max(0, min(first, len(ids)) - 1)]  # shared where it can be
                common = next((k for k, (a, b) in enumerate(zip(stem, previous)) if a != b),
                              min(len(stem), len(previous)))
                if group and cells + len(ids) - common > self.n_ctx:
                    break
                group.append((order.pop(0), ids, len(stem)))
                cells, previous = cells + len(ids) - common, stem
            self._score_group(group, sequences, reduce, out)
        return out

    def _score_group(self, group, sequences, reduce, out) -> None:
        import numpy as np

        root, leaves = _Node(None, 0), []
        for index, ids, stem in group:  # the prefix tree of the stems; each tail a leaf
            node, pos = root, 0
            while pos < stem:
                child = node.children.get(ids[pos])
                if child is None:
                    child = node.children[ids[pos]] = _Node(node, pos)
                    child.tokens = ids[pos:stem]
                    pos = stem
                    node = child
                    break
                shared = next((k for k, t in enumerate(child.tokens)
                               if pos + k >= stem or ids[pos + k] != t), len(child.tokens))
                if shared < len(child.tokens):  # split the child where this stem leaves it
                    upper = _Node(node, child.start)
                    upper.tokens, child.tokens = child.tokens[:shared], child.tokens[shared:]
                    child.parent, child.start = upper, child.start + shared
                    upper.children = {child.tokens[0]: child}
                    node.children[upper.tokens[0]] = upper
                    child = upper
                node, pos = child, pos + shared
            leaf = _Node(node, stem)
            leaf.tokens, leaf.leaf = ids[stem:], (index, sequences[index][1])
            leaves.append(leaf)
        level, rows, next_id = list(root.children.values()), {}, 0
        for leaf in leaves:  # leaves hang off the tree, not in children (same first token)
            if leaf.parent is root:
                level.append(leaf)
        self._ll.llama_memory_clear(self._mem, True)
        while level:
            tokens = []
            for node in level:
                node.seq_id, next_id = next_id, next_id + 1
                if node.parent is not root:
                    self._ll.llama_memory_seq_cp(self._mem, node.parent.seq_id, node.seq_id,
                                                 -1, -1)
                for k, token in enumerate(node.tokens):
                    pos = node.start + k
                    wanted = node.leaf is not None and node.leaf[1] - 1 <= pos < \
                        node.start + len(node.tokens) - 1
                    tokens.append((node, pos, token, wanted))
            self._decode(tokens, rows)
            following = []
            for node in level:
                following += node.children.values()
                following += [leaf for leaf in leaves if leaf.parent is node]
            level = following
        for leaf in leaves:
            index, first = leaf.leaf
            got = rows.get(id(leaf), [])
            logits = np.stack(got) if got else np.zeros((0, self.n_vocab), np.float32)
            out[index] = reduce(logits, np.asarray(
                sequences[index][0][:self.max_tokens][first:], dtype=np.int64))

    def _decode(self, tokens: list, rows: dict) -> None:
        """Decode (node, pos, token, wanted) rows in batches of n_batch; keep wanted logits."""
        import numpy as np

        ll, batch = self._ll, self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            for n, (node, pos, token, wanted) in enumerate(chunk):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0], batch.logits[n] = node.seq_id, wanted
            batch.n_tokens = len(chunk)
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                raise FinetuneError(f"llama.cpp could not decode while scoring (code {rc}).")
            owners = [node for node, _, _, wanted in chunk if wanted]
            if owners:
                logits = np.array(np.ctypeslib.as_array(ll.llama_get_logits(self._ctx),
                                                        shape=(len(owners), self.n_vocab)))
                for row, node in enumerate(owners):
                    rows.setdefault(id(node), []).append(logits[row])

    def close(self) -> None:
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._ll.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def windows(llm, text: str, n_ctx: int, max_chunks: int) -> list[list[int]]:
    # special=True: chat-template text keeps its control tokens (<|im_start|>, <|end|>)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    prefix = llm.tokenize(b"", add_bos=True)  # [bos] only if the model wants one
    width = n_ctx - len(prefix)
    chunks = [prefix + tokens[i:i + width] for i in range(0, len(tokens), width)]
    chunks = [c for c in chunks if len(c) == n_ctx][:max_chunks]
    if not chunks:
        raise FinetuneError(f"Held-out text too short: need at least {n_ctx} tokens.")
    return chunks


def log_softmax(logits):
    """Rows of raw logits -> log-probabilities (float32; the normaliser summed in float64)."""
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    norm = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64)).astype(np.float32)
    shifted -= norm[:, None]
    return shifted


def log_probs(scorer: Scorer, chunks: list[list[int]]) -> list:
    """Each window's next-token log-probabilities over its second half (float32 rows)."""
    return scorer.score([(ids, len(ids) // 2) for ids in chunks],
                        lambda logits, _targets: log_softmax(logits))


def chat_renderer(llm):
    """(messages, add_generation_prompt) -> text, with the GGUF's chat template as the chat
    engine uses it (ChatML when the file has none)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from finetune.recipe.data import CHATML_TEMPLATE

    template = llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE

    def token(i: int) -> str:
        return llm._model.token_get_text(i) if i >= 0 else ""

    formatters = {flag: Jinja2ChatFormatter(template, eos_token=token(llm.token_eos()),
                                            bos_token=token(llm.token_bos()),
                                            add_generation_prompt=flag) for flag in (True, False)}
    return lambda messages, generation: formatters[generation](messages=messages).prompt
