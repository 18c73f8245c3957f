"""Import a llama-family GGUF file into an MLX model directory.

Owns: turning one ``.gguf`` file into the directory layout ``mlx_lm.load`` reads
(``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``), written atomically so an interrupted import never
leaves a half-written model behind.

Never: loads a model for generation, or downloads anything.

MLX reads GGUF natively (``mx.load(path, return_metadata=True)``): Q4_0, Q4_1
and Q8_0 tensors arrive as MLX affine-quantized triples (weight, scales,
biases, group size 32); other types arrive as floats. The tokenizer travels as
metadata (vocabulary, merges, special ids, chat template) and is rebuilt here as
a Hugging Face ``tokenizers`` byte-level BPE. GGUF converters store llama Q/K
projections in the interleaved RoPE layout, so the imported config sets
``rope_traditional`` instead of permuting the weights back.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

# GGUF tensor names (llama.cpp's naming) -> mlx-lm llama module paths.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF quantized blocks are always 32 values wide.
_GGUF_GROUP_SIZE = 32
# llama.cpp pre-tokenizer names whose split rule is GPT-2's regex with each
# digit on its own (StarCoder / SmolLM family).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_CONTROL_TYPES = {2, 3, 4}


class GGUFImportError(ValueError):
    """The file is not a GGUF model this importer can turn into MLX."""


def _scalar(meta, key, default=None):
    value = meta.get(key, default)
    if hasattr(value, "item"):  # MLX stores numeric metadata as 0-d arrays
        return value.item()
    return value


def _module_path(gguf_name):
    """Map ``blk.3.attn_q`` to ``model.layers.3.self_attn.q_proj``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return _TOP_NAMES[parts[0]]
    raise GGUFImportError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def convert_weights(weights):
    """Rename GGUF tensors and collect each quantized module's bits."""
    out, quantized = {}, {}
    for name, value in weights.items():
        base, _, kind = name.rpartition(".")
        path = _module_path(base)
        out[f"{path}.{kind}"] = value
        if kind == "scales":
            packed = weights[f"{base}.weight"]
            bits = packed.shape[-1] * 32 // (value.shape[-1] * _GGUF_GROUP_SIZE)
            quantized[path] = {"group_size": _GGUF_GROUP_SIZE, "bits": bits}
    return out, quantized


def model_config(meta, quantized):
    """Build an mlx-lm ``config.json`` for a llama GGUF from its metadata."""
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            f"GGUF architecture {arch!r} is not supported (only 'llama'); "
            "convert the model to MLX with mlx_lm.convert and pass its directory"
        )

    def get(key, default=None):
        return _scalar(meta, f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "lm_head.weight" not in quantized
        and "lm_head" not in quantized,
    }
    if quantized:
        # The top-level entry is a fallback; every quantized module is listed
        # with its own bits because embeddings are often 8-bit, the rest 4-bit.
        first = next(iter(quantized.values()))
        config["quantization"] = {**first, **quantized}
    return config


def tokenizer_files(meta):
    """Rebuild ``tokenizer.json`` and ``tokenizer_config.json`` from metadata."""
    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = meta["tokenizer.ggml.merges"]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    if _scalar(meta, "tokenizer.ggml.pre", "default") in _DIGIT_SPLIT_PRE:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre = byte_level
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in _CONTROL_TYPES
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": {**byte_level},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }

    def special(key):
        index = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 4096)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return tokenizer, tokenizer_config


def import_gguf(gguf_path, out_dir):
    """Write an MLX model directory for ``gguf_path`` at ``out_dir``.

    The directory appears complete or not at all: it is assembled in a
    temporary sibling and renamed into place.
    """
    import mlx.core as mx  # imported late: MLX must load after the BLAS choice

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        weights, meta = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:  # MLX raises plain exceptions for unreadable files
        raise GGUFImportError(f"cannot read {gguf_path}: {e}") from e
    weights, quantized = convert_weights(weights)
    config = model_config(meta, quantized)
    tokenizer, tokenizer_config = tokenizer_files(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.",
                                dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights,
                            metadata={"format": "mlx"})
        for name, data in [("config.json", config), ("tokenizer.json", tokenizer),
                           ("tokenizer_config.json", tokenizer_config)]:
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _remove_abandoned(out_dir):
    """Delete temporary directories left by imports whose process is gone (a
    server stopped mid-import exits without waiting for it)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*"):
        pid = tmp.name[len(out_dir.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
