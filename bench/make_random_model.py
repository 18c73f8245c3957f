"""Write a random-weight model: the shape, quantization and tokenizer of a real one.

    python bench/make_random_model.py SOURCE_DIR OUT_DIR
    python bench/make_random_model.py SOURCE_DIR OUT_DIR --shape llama-3.1-8b

For benchmarks on machines the real weights cannot reach (each GPU command
carries at most 64 MiB): only a config and tokenizer files travel, and the
weights are drawn there. Speed matches the real model; the text does not.

Without --shape, SOURCE_DIR's config.json is copied. With --shape, the config
is the named model's published architecture (4-bit, group 64, bfloat16, as
mlx-community's conversions) and only the tokenizer comes from SOURCE_DIR,
its vocabulary padded with placeholder tokens up to the shape's vocab_size so
every id the random model emits can be detokenized.
"""

import argparse
import importlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_attention_heads": 32,
           "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
           "quantization": {"group_size": 64, "bits": 4}}
SHAPES = {
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                      "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192,
                                      "rope_type": "llama3"}},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "head_dim": 128, "tie_word_embeddings": False,
                     "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0,
                                      "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192,
                                      "rope_type": "llama3"}},
}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def pad_tokenizer(path, vocab_size):
    """Give ids up to ``vocab_size`` a placeholder entry in a BPE vocabulary."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in used:
            vocab[f"<pad{i}>"] = i
    path.write_text(json.dumps(data, ensure_ascii=False))


def make(source, out, shape=None, seed=0):
    source, out = Path(source), Path(out)
    config = (dict(SHAPES[shape]) if shape
              else json.loads((source / "config.json").read_text()))
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if config.get("torch_dtype") in DTYPES:
        model.set_dtype(DTYPES[config["torch_dtype"]])
    quant = config.get("quantization")
    if quant:
        # Per-module entries (e.g. an 8-bit embedding) win over the default.
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda path, module: quant.get(path, True)
                    if hasattr(module, "to_quantized") else False)
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    if shape:
        pad_tokenizer(out / "tokenizer.json", config["vocab_size"])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="model directory with the tokenizer (and config)")
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    args = parser.parse_args()
    make(args.source, args.out, args.shape)
