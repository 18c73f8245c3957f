"""Write a random-weight copy of a model: same shape, quantization and tokenizer.

    python bench/make_random_model.py SOURCE_DIR OUT_DIR

For benchmarks on machines the real weights cannot reach (each GPU command
carries at most 64 MiB): only config.json and the tokenizer files travel, and
the weights are drawn there. Speed matches the real model; the text does not.
"""

import importlib
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make(source, out, seed=0):
    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
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
    return out


if __name__ == "__main__":
    make(*sys.argv[1:3])
