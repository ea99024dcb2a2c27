"""Stand-ins for phi-3.5-mini and mistral-7b: real config, tokenizer, chat template; random weights."""
# The Hub is unreachable here, so the two named bases are rebuilt: every value of config.json,
# tokenizer_config.json and generation_config.json as the repos publish them, a SentencePiece
# BPE model (byte fallback, like Llama's) trained offline on English text, the repos' special
# tokens at their real ids, and random bf16 weights in safetensors shards like the repos'.
#
#     python -m tests.support.standins {phi-3.5-mini,mistral-7b} --size {full,tiny} --out DIR
#
# Sources (the Hub itself cannot be read from here): Phi-3.5-mini-instruct's config.json as
# vendored verbatim by several public repos that agree value for value (onnx-diagnostic /
# experimental-experiment's get_phi35, lightning-thunder's hf_phi3_rope, a gpt-fast fork's
# "Phi-3.5-mini-instruct" entry); its chat template as vendored by llama.cpp's test-chat-template
# and OpenVINO GenAI; its added_tokens_decoder as vendored with Phi-3's tokenizer_config (the
# same table ships with Phi-3.5). Mistral-7B-Instruct-v0.2's tokenizer_config keys from
# llama-cpp-python's tests (mistral_7b_tokenizer_config), its v0.2 chat template from a vLLM
# server log serving that repo; its architecture numbers from the model card (32k context,
# rope_theta 1e6, no sliding window) and public configs (mistral-src, gpt-fast).
# Deliberately left out: `auto_map` (it points at remote-code files the stand-in does not ship;
# transformers' native Phi3 is what this project runs) and `transformers_version`.
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

MARKER = "finechat-standin.json"  # written last: a folder without it is a half-built one
SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB"), as the repos
INIT_STD = 0.02  # both configs' initializer_range

# Phi-3.5-mini-instruct config.json rope_scaling (longrope): head_dim 96 -> 48 entries each.
PHI35_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062]
PHI35_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533]

CONFIGS = {
    "phi-3.5-mini": {  # microsoft/Phi-3.5-mini-instruct
        "_name_or_path": "Phi-3.5-mini-instruct", "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": PHI35_LONG_FACTOR, "short_factor": PHI35_SHORT_FACTOR,
                         "type": "longrope"},
        # Every vendored copy found says 262144 (none says 262143).
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064},
    "mistral-7b": {  # mistralai/Mistral-7B-Instruct-v0.2
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000},
}
# 2 layers, narrow, everything else as published. Each keeps its real head_dim (hidden / heads:
# Phi 96, so the real 48-entry longrope lists fit unchanged; Mistral 128) and widths that are
# multiples of 256, so Q4_K_M / Q5_K_M use real k-quant blocks as on the full models. Mistral
# keeps grouped-query attention (2 query heads per KV head, as 32 / 8 does 4).
TINY = {
    "phi-3.5-mini": {"num_hidden_layers": 2, "hidden_size": 768, "intermediate_size": 1024,
                     "num_attention_heads": 8, "num_key_value_heads": 8},
    "mistral-7b": {"num_hidden_layers": 2, "hidden_size": 512, "intermediate_size": 1024,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
}
GENERATION_CONFIGS = {
    "phi-3.5-mini": {"_from_model_config": True, "bos_token_id": 1,
                     "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
    "mistral-7b": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2},
}

PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL_V02_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def _token(content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip,
            "single_word": False, "special": special}


_LLAMA_BASE = {0: _token("<unk>"), 1: _token("<s>"), 2: _token("</s>")}
_PHI_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
              "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
              "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]  # ids 32000..32010
TOKENIZER_CONFIGS = {
    "phi-3.5-mini": {
        "add_bos_token": False, "add_eos_token": False,
        # Phi-3's table marks </s> non-special with rstrip, and every added token but
        # <|endoftext|> with rstrip (it eats the newline after a role tag).
        "added_tokens_decoder": {
            **{str(i): t for i, t in _LLAMA_BASE.items()}, "2": _token("</s>", False, True),
            **{str(32000 + i): _token(c, rstrip=c != "<|endoftext|>")
               for i, c in enumerate(_PHI_ADDED)}},
        "bos_token": "<s>", "chat_template": PHI35_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False},
    "mistral-7b": {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): t for i, t in _LLAMA_BASE.items()},
        "additional_special_tokens": [], "bos_token": "<s>",
        "chat_template": MISTRAL_V02_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True,
        "model_max_length": 1000000000000000019884624838656, "pad_token": None,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False},
}
ARCHS = tuple(CONFIGS)


def hf_config(arch: str, size: str = "full") -> dict:
    """config.json of the stand-in: the published one, or its 2-layer narrow version."""
    if arch not in CONFIGS or size not in ("full", "tiny"):
        raise ValueError(f"unknown stand-in {arch!r} / {size!r}: arch in {ARCHS}, size full|tiny")
    config = copy.deepcopy(CONFIGS[arch])
    if size == "tiny":
        config.update(TINY[arch])
    return config


# -- tokenizer ---------------------------------------------------------------------------------

def english_corpus(max_chars: int = 2_000_000) -> list[str]:
    """Docstring lines of the pinned transformers package (English prose, identical wherever
    requirements.txt is installed), deduplicated, in file order."""
    import transformers

    docstring = re.compile(r'"""(.*?)"""', re.S)
    lines, seen, size = [], set(), 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        for doc in docstring.findall(path.read_text(encoding="utf-8")):
            for line in (ln.strip() for ln in doc.splitlines()):
                if len(line) > 20 and line not in seen:
                    seen.add(line)
                    lines.append(line)
                    size += len(line)
        if size >= max_chars:
            break
    return lines


def train_sentencepiece(lines: list[str], vocab_size: int = 32000) -> bytes:
    """A Llama-style SentencePiece BPE model: <unk> <s> </s> at 0-2, byte fallback, split digits,
    no normalization, a dummy-prefix space."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=0.99995,
        max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)  # 1 thread: reproducible
    return model.getvalue()


def write_tokenizer(arch: str, dest: Path, sp_model: bytes) -> dict:
    """tokenizer.model + the repo's tokenizer_config.json / special_tokens_map.json (and Phi's
    added_tokens.json) + a tokenizer.json converted by transformers from them."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from transformers import AutoTokenizer

    config = TOKENIZER_CONFIGS[arch]
    added = {t["content"]: int(i) for i, t in config["added_tokens_decoder"].items()
             if int(i) >= 32000}
    files = {"tokenizer_config.json": config, "special_tokens_map.json": {
        key: value if isinstance(value, list) else
        {k: v for k, v in _token(value).items() if k != "special"}
        for key in ("additional_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token")
        if (value := config.get(key)) is not None}}
    if added:
        files["added_tokens.json"] = dict(sorted(added.items()))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(sp_model)
    for name, content in files.items():
        (dest / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    # transformers converts tokenizer.model (+ the added tokens) into a fast tokenizer.json ...
    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(dest).save_pretrained(tmp)
        fast = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    # ... in the layout both repos ship (transformers 4's LlamaConverter, legacy): "▁" prepended
    # to every text segment by the normalizer, so text after a special token starts with "▁",
    # as in llama.cpp. transformers 5's own conversion (Metaspace, prepend_scheme "first" when
    # legacy is false) would not, and transformers 5 reads Phi-3's tokenizer.json as it is.
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                            normalizers.Replace(" ", "▁")])
    fast.pre_tokenizer = None
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bos = config["bos_token"]
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0" if config["add_bos_token"] else "$A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1" if config["add_bos_token"] else "$A:0 $B:1",
        special_tokens=[(bos, 1)])
    fast.save(str(dest / "tokenizer.json"))
    return added


# -- weights -----------------------------------------------------------------------------------

def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture saves, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_weights(config: dict, dest: Path, seed: int = 0,
                  shard_bytes: int = SHARD_BYTES) -> int:
    """bf16 safetensors, one tensor at a time (peak RAM ~ one shard): norms 1, the rest
    N(0, 0.02) from a generator seeded per tensor. Returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    shapes = parameter_shapes(config)
    shards, current, used = [], [], 0
    for name, shape in shapes.items():
        size = 2 * _numel(shape)
        if current and used + size > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map, total = {}, 0
    for filename, shard in zip(names, shards):
        tensors = {}
        for name in shard:
            generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, INIT_STD, generator=generator)
            tensors[name] = tensor
            weight_map[name] = filename
            total += tensor.numel()
        save_file(tensors, dest / filename, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


# -- the stand-in ------------------------------------------------------------------------------

def build(arch: str, size: str, out: Path, seed: int = 0) -> dict:
    """Write the stand-in HF folder `out` (replaced if it exists); returns what it wrote."""
    started = time.monotonic()
    config = hf_config(arch, size)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = english_corpus()
    corpus_sha = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    added = write_tokenizer(arch, out, train_sentencepiece(lines))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(GENERATION_CONFIGS[arch], indent=2) + "\n")
    n_params = write_weights(config, out, seed)
    info = {"arch": arch, "size": size, "seed": seed, "parameters": n_params,
            "added_tokens": added, "tokenizer_corpus_sha256": corpus_sha,
            "seconds": round(time.monotonic() - started, 1)}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arch", choices=ARCHS)
    parser.add_argument("--size", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = build(args.arch, args.size, args.out, args.seed)
    print(f"wrote {args.out.resolve()}: {args.arch} ({args.size}), "
          f"{info['parameters']:,} parameters, in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
