"""The streaming merge: a LoRA adapter folded into a base's safetensors one tensor at a time.

peft's `merge_and_unload` needs the whole 16-bit base in RAM (~14.5 GB for Mistral-7B, more
than a 15 GB Spaces box can give). Here each base tensor is read, cast to the merge dtype,
given its LoRA delta exactly as peft computes it, and written straight into an output shard
whose header was written first (tensorfile.py), so RAM holds one tensor at a time whatever
the model size.
The result is what `from_pretrained(dtype=...)` + `merge_and_unload()` + `save_pretrained()`
writes (same keys, bit-identical tensors, same dtype; tests/finetune/test_merge.py).

Anything this does not read (pickled `.bin` weights, DoRA and other LoRA variants,
architectures whose checkpoints transformers converts on load) goes through peft's in-memory
merge instead, with a line in the log.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.export.tensorfile import Readers, read_header, torch_dtype, write_sharded

log = logging.getLogger("finechat.job")

PEFT_PREFIX = "base_model.model."
ADD_BLOCK_ELEMENTS = 4 * 2**20  # adds the delta 16 MB of fp32 at a time
# LoraConfig options that change what merging means (peft merges them through a variant or a
# different code path): left to peft.
UNSUPPORTED_OPTIONS = ("lora_bias", "use_qalora", "target_parameters", "trainable_token_indices",
                       "layer_replication", "ensure_weight_tying")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")


class Unsupported(Exception):
    """The streaming merge cannot read this base or adapter; peft's in-memory merge can."""


@dataclass
class Delta:
    module: str = ""
    a_key: str = ""  # keys in the adapter file
    b_key: str = ""
    scaling: float = 1.0
    layer: str = "Linear"  # peft's merge differs for Conv1D (transposed) and Embedding


@dataclass
class Plan:
    base_dir: Path
    adapter_file: Path
    dtype: object  # torch.dtype of the merged floats
    config: object  # the base's PretrainedConfig, as save_pretrained writes it
    generation_config: object | None
    sources: dict[str, tuple[Path, str]] = field(default_factory=dict)  # out key -> (shard, key)
    out_dtypes: dict[str, object] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    deltas: dict[str, Delta] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # out key -> adapter key


def merge(base_model_path: str, adapter_dir: Path, out_dir: Path, dtype) -> Path:
    """Base + adapter -> an HF folder in `out_dir` (weights, config, tokenizer)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        plan = plan_merge(base_model_path, adapter_dir, dtype)
    except Unsupported as why:
        log.info("streaming merge not possible (%s): merging in memory with peft", why)
        merge_in_memory(base_model_path, adapter_dir, out_dir, dtype)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        write_merged(plan, out_dir)
    save_tokenizer(base_model_path, adapter_dir, out_dir)
    return out_dir


def local_checkpoint(base_model_path: str) -> Path:
    """A local folder as is; a Hub id -> its snapshot in the local HF cache (training fetched
    it; nothing is downloaded here)."""
    path = Path(base_model_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(base_model_path), local_files_only=True))
    except Exception as exc:
        raise Unsupported(f"{base_model_path} is not in the local Hugging Face cache") from exc


def plan_merge(base_model_path: str, adapter_dir: Path, dtype) -> Plan:
    """Which base tensor each output tensor comes from, and what is added to or replaces it.
    Raises Unsupported for anything peft would merge differently."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir = local_checkpoint(base_model_path)
    adapter_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise Unsupported("the adapter has no adapter_model.safetensors")
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):  # the architecture's names, shapes and ties; no memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _check_architecture(model)
    saved, canonical = saved_keys(model)
    checkpoint = _checkpoint_index(base_dir)

    # config.json as save_pretrained records it
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    plan = Plan(base_dir, adapter_file, dtype, model.config, _generation_config(model, base_dir))
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    for shard, keys in checkpoint.items():
        for key, (ckpt_dtype, shape) in keys.items():
            name = _model_key(key, canonical, prefix)
            out = canonical.get(name)
            # A tied group comes from its kept member when the checkpoint has it (as loading does).
            if out is None or (out in plan.sources and name != out):
                continue
            if shape != saved[out]:
                raise Unsupported(f"{key} has shape {shape}, the model expects {saved[out]}")
            plan.sources[out] = (shard, key)
            plan.shapes[out] = shape
            plan.out_dtypes[out] = dtype if ckpt_dtype.is_floating_point else ckpt_dtype
    missing = sorted(set(saved) - set(plan.sources))
    if missing:
        raise Unsupported(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[0]}")
    _plan_adapter(plan, Path(adapter_dir), canonical, model)
    return plan


def _check_architecture(model) -> None:
    from transformers.conversion_mapping import get_model_conversion_mapping

    if get_model_conversion_mapping(model, add_legacy=False):
        raise Unsupported(f"{type(model).__name__} checkpoints are converted on load")
    for owner in model.modules():  # fp32 islands inside a 16-bit model: peft keeps them
        if getattr(owner, "_keep_in_fp32_modules", None) or \
                getattr(owner, "_keep_in_fp32_modules_strict", None):
            raise Unsupported(f"{type(model).__name__} keeps modules in fp32")


def saved_keys(model) -> tuple[dict[str, tuple], dict[str, str]]:
    """The keys save_pretrained writes (tied copies dropped, as safetensors has no aliases)
    with their shapes, and every state-dict key -> the saved key holding its tensor."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    saved = remove_tied_weights_from_state_dict(dict(state), model)
    holder = {id(model.get_parameter_or_buffer(k)): k for k in saved}
    canonical = {k: holder.get(id(model.get_parameter_or_buffer(k)), k) for k in state}
    canonical = {k: v for k, v in canonical.items() if v in saved}
    return {k: tuple(t.shape) for k, t in saved.items()}, canonical


def _model_key(key: str, known: dict, prefix: str) -> str:
    """A checkpoint key under the causal LM's names: bases saved from the bare model lack its
    prefix (`layers.0...` for `model.layers.0...`), as from_pretrained allows."""
    if key in known or not prefix:
        return key
    if prefix + key in known:
        return prefix + key
    return key.removeprefix(prefix) if key.removeprefix(prefix) in known else key


def _checkpoint_index(base_dir: Path) -> dict[Path, dict[str, tuple]]:
    """shard -> {key: (torch dtype, shape)}, read from the safetensors headers only."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({base_dir / name for name in weight_map.values()})
    elif (base_dir / "model.safetensors").is_file():
        shards = [base_dir / "model.safetensors"]
    else:
        raise Unsupported(f"no safetensors weights in {base_dir}")
    found = {}
    for shard in shards:
        with open(shard, "rb") as fh:
            header, _ = read_header(fh)
        found[shard] = {k: (torch_dtype(v["dtype"]), tuple(v["shape"])) for k, v in header.items()}
    return found


def _plan_adapter(plan: Plan, adapter_dir: Path, canonical: dict, model) -> None:
    from peft import PeftConfig
    from peft.utils.other import get_pattern_key

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != "LORA":
        raise Unsupported(f"{config.peft_type} adapters")
    # peft's own list of variants (DoRA, ...): fields flagged is_lora_variant, init options
    variants = [f.name for f in dataclasses.fields(config)
                if f.metadata.get("is_lora_variant") and getattr(config, f.name)
                or config.init_lora_weights in f.metadata.get("lora_variants", ())]
    variants += [name for name in UNSUPPORTED_OPTIONS if getattr(config, name, None)]
    if variants:
        raise Unsupported(f"LoRA with {', '.join(variants)}")
    tied = {k for k, v in canonical.items() if k != v} | {v for k, v in canonical.items() if k != v}
    with open(plan.adapter_file, "rb") as fh:
        keys = list(read_header(fh)[0])
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match is None:  # modules_to_save, saved embeddings: whole tensors replacing the base's
            target = name.replace(".base_layer.", ".")
            # a modules_to_save copy of a tied weight unties it in peft's merge
            if target not in canonical or (target in tied and ".base_layer." not in name):
                raise Unsupported(f"adapter tensor {key}")
            plan.replacements[canonical[target]] = key
            continue
        module = match["module"]
        out = canonical.get(f"{module}.weight")
        layer = _layer_kind(model, module)
        if out is None or layer is None or (layer == "Embedding") != bool(match["emb"]):
            raise Unsupported(f"LoRA on {module}, not a Linear, Conv1D or Embedding weight")
        delta = plan.deltas.setdefault(out, Delta(module, layer=layer))
        if delta.module != module:
            raise Unsupported(f"LoRA on {delta.module} and {module}, one tied weight")
        if (match["ab"] or match["emb"]) == "A":
            delta.a_key = key
        else:
            delta.b_key = key
        # peft's own lookup: the module's name in the causal LM against the patterns
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module),
                                         config.lora_alpha)
        delta.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    broken = [out for out, d in plan.deltas.items() if not (d.a_key and d.b_key)]
    if broken:
        raise Unsupported(f"LoRA A without B (or B without A) for {broken[0]}")


def _layer_kind(model, module: str) -> str | None:
    """The three layer types whose merge is reproduced here (peft sets fan_in_fan_out from the
    layer type, whatever the config says: Conv1D stores its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    try:
        layer = model.get_submodule(module)
    except AttributeError:
        return None
    for kind in (torch.nn.Embedding, Conv1D, torch.nn.Linear):
        if isinstance(layer, kind):
            return kind.__name__
    return None


def _generation_config(model, base_dir: Path):
    """What from_pretrained attaches (generation_config.json, else one made from config.json)."""
    if not model.can_generate():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base_dir)
    except OSError:
        return GenerationConfig.from_pretrained(base_dir, config_file_name="config.json",
                                                _from_model_config=True)


# -- writing ------------------------------------------------------------------------------

def write_merged(plan: Plan, out_dir: Path) -> Path:
    """Output shards in the base's tensor order (sequential reads), then the configs."""
    entries = [(k, plan.out_dtypes[k], plan.shapes[k]) for k in plan.sources]
    with Readers() as readers:
        write_sharded(out_dir, entries, lambda key: merged_tensor(plan, key, readers))
    plan.config.save_pretrained(out_dir)
    if plan.generation_config is not None:
        plan.generation_config.save_pretrained(out_dir)
    return out_dir


def merged_tensor(plan: Plan, key: str, readers: Readers):
    """One output tensor, computed as peft's merge computes it."""
    if key in plan.replacements:
        tensor = readers.get(plan.adapter_file, plan.replacements[key])
    else:
        tensor = readers.get(*plan.sources[key])
    if tensor.is_floating_point():
        tensor = tensor.to(plan.dtype)  # what from_pretrained(dtype=...) does on load
    delta = plan.deltas.get(key)
    if delta is not None:
        # peft loads LoRA weights in fp32 next to a 16-bit base (autocast_adapter_dtype) and
        # takes B @ A in fp32, scaled. Linear.merge adds that fp32 delta in place (one rounding,
        # to the base's dtype); Embedding.merge rounds the delta to the base's dtype first.
        a = readers.get(plan.adapter_file, delta.a_key).float()
        b = readers.get(plan.adapter_file, delta.b_key).float()
        product = (b @ a).mul_(delta.scaling)  # in place: the same products, one buffer less
        product = product if delta.layer == "Linear" else product.T
        # Row blocks: a mixed-dtype `+=` computes into an fp32 temporary as large as its
        # operands; element by element the result is the same.
        rows = max(1, ADD_BLOCK_ELEMENTS // max(1, tensor.shape[-1]))
        for start in range(0, tensor.shape[0], rows):
            block = product[start:start + rows]
            tensor[start:start + rows] += block.to(tensor.dtype) \
                if delta.layer == "Embedding" else block
    return tensor


# -- the fallback and the tokenizer ---------------------------------------------------------

def merge_in_memory(base_model_path: str, adapter_dir: Path, out_dir: Path, dtype) -> Path:
    """peft's merge on the whole base in RAM (from_pretrained reads .bin files with
    torch.load(weights_only=True): no arbitrary pickles)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype, device_map="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    shutil.rmtree(out_dir, ignore_errors=True)
    merged.save_pretrained(out_dir)
    del merged, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def save_tokenizer(base_model_path: str, adapter_dir: Path, out_dir: Path) -> None:
    """The adapter folder carries the tokenizer used in training (its chat template included).
    transformers 5 saves no SentencePiece `tokenizer.model`, which llama.cpp's converter needs
    for Phi-3: it is copied from wherever the training tokenizer or the base has one."""
    from transformers import AutoTokenizer

    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base_model_path
                                  ).save_pretrained(out_dir)
    try:
        base = [local_checkpoint(base_model_path)]
    except Unsupported:
        base = []
    for folder in ([Path(adapter_dir)] if has_tokenizer else []) + base:
        target = Path(out_dir) / "tokenizer.model"
        if (folder / "tokenizer.model").is_file() and not target.is_file():
            shutil.copyfile(folder / "tokenizer.model", target)
    # transformers 5 leaves add_bos_token / add_eos_token out of tokenizer_config.json; the
    # converter reads them there (without, llama.cpp adds a BOS to Phi-3 prompts)
    for folder in base:
        if (folder / "tokenizer_config.json").is_file():
            flags = {k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text())
                     .items() if k in ("add_bos_token", "add_eos_token")}
            out_config = Path(out_dir) / "tokenizer_config.json"
            out_config.write_text(json.dumps({**flags, **json.loads(out_config.read_text())},
                                             indent=2))
