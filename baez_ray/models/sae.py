"""SAEs, loaded by sae-lens: from disk (`sae.path`) or from a pretrained release
(`sae.release` + `sae.sae_id`, e.g. Gemma Scope 2); an SAE's decoder alone
(`decoder_rows`: the logit lens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from baez_ray.config import SAEConfig

if TYPE_CHECKING:
    import torch


def load_sae(cfg: SAEConfig, device: str, d_model: int | None = None):
    """Load an SAE with sae-lens, from disk or from a pretrained release."""
    from sae_lens import SAE

    if cfg.path:
        p = Path(cfg.path)
        if not p.exists():
            raise FileNotFoundError(f"sae.path {cfg.path}: no such SAE directory")
        try:
            sae = SAE.load_from_disk(p, device=device)
        except Exception as e:
            raise ValueError(f"sae.path {cfg.path}: cannot load SAE ({type(e).__name__}: {e})") from None
        where = cfg.path
    else:
        try:
            sae = SAE.from_pretrained(cfg.release, cfg.sae_id, device=device)
        except Exception as e:  # offline machines land here
            raise ValueError(f"sae {cfg.release}/{cfg.sae_id}: cannot load ({type(e).__name__}: {e})") from None
        where = f"{cfg.release}/{cfg.sae_id}"
    if d_model is not None and sae.cfg.d_in != d_model:
        raise ValueError(f"sae {where}: d_in={sae.cfg.d_in} does not match the model's hidden size {d_model}")
    return sae.eval()


def n_sae_features(sae_cfg: SAEConfig) -> int:
    """d_sae without building the SAE (cfg.json on disk), else by loading it."""
    if sae_cfg.path and (Path(sae_cfg.path) / "cfg.json").exists():
        return int(json.loads((Path(sae_cfg.path) / "cfg.json").read_text())["d_sae"])
    return int(load_sae(sae_cfg, "cpu").cfg.d_sae)


def decoder_rows(cfg: SAEConfig) -> torch.Tensor:
    """W_dec [d_sae, d_in] as float32 on the CPU. An SAE folder in sae-lens' format
    (`sae_weights.safetensors` with `W_dec`) gives it without importing sae-lens (seconds
    per process) or reading the encoder (half the SAE's memory); a release, or another
    layout, is loaded by sae-lens and its decoder kept."""
    if cfg.path:
        weights = Path(cfg.path) / "sae_weights.safetensors"
        if weights.exists():
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as h:
                if "W_dec" in h.keys():
                    return h.get_tensor("W_dec").float()
    sae = load_sae(cfg, "cpu")
    return sae.W_dec.detach().float()
