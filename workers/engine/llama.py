"""A Llama-family decoder over a paged KV pool: embed -> N x (attention, MLP) -> norm -> lm_head.

Plain tensors and functions rather than nn.Modules: weights load straight from safetensors into
fused QKV and gate/up projections (fewer, larger GEMMs on the hot path), packed once for the
device's fastest GEMM (`linear.py`), and there is no training state to carry. The math mirrors
transformers' LlamaForCausalLM op for op, so greedy output matches `generate` token for token.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from workers.engine.attention import StepAttention, paged_attention
from workers.engine.linear import Gemm, Linear, measure_gemm, resolve_gemm

log = logging.getLogger("pdrouter.engine")


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict  # rope_type, rope_theta and the type's own parameters

    @classmethod
    def from_dict(cls, cfg: dict) -> LlamaConfig:
        kind, act = cfg.get("model_type"), cfg.get("hidden_act", "silu")
        if kind != "llama" or act != "silu":
            raise ValueError(
                f"unsupported model (model_type={kind!r}, hidden_act={act!r}): "
                "this runner serves Llama-family models (model_type 'llama', silu MLP)"
            )
        heads = cfg["num_attention_heads"]
        # NOTE: transformers >= 5 writes `rope_parameters`; older configs carry rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope=rope,
        )


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies exactly as transformers computes them (default, linear, llama3)."""
    p, dim = cfg.rope, cfg.head_dim
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = p["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / p["factor"]
    if kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, 1, head_dim] (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass(slots=True)
class LlamaLayer:
    input_norm: torch.Tensor
    qkv: Linear  # hidden -> (heads + 2 * kv_heads) * head_dim: q, k, v side by side
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 * intermediate: gate, up side by side
    down: Linear


class LlamaModel:
    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor], gemm: Gemm = "auto") -> None:
        self.cfg = cfg
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.gemm_ratios: dict[int, float] = {}  # auto's measurement: oneDNN/blas time by token count
        self.gemm = gemm = self._choose_gemm(cfg, weights, gemm)
        head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = Linear(head, None, gemm)
        self.layers = [self._layer(weights, f"model.layers.{i}.", gemm) for i in range(cfg.num_layers)]
        self.inv_freq = rope_inv_freq(cfg).to(self.embed.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5

    def _choose_gemm(self, cfg: LlamaConfig, w: dict[str, torch.Tensor], gemm: Gemm) -> Gemm:
        """`auto` on a CPU where oneDNN runs: measured on layer 0's projections (linear.measure_gemm)."""
        resolved = resolve_gemm(gemm, self.embed.device, self.embed.dtype)
        if gemm != "auto" or resolved != "onednn":
            return resolved
        p = "model.layers.0."
        names = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")
        chosen, ratios = measure_gemm([w[f"{p}{n}.weight"] for n in names])
        self.gemm_ratios = ratios
        log.info("gemm auto: %s (oneDNN/blas time at %s tokens)", chosen,
                 ", ".join(f"{m}: {r:.2f}" for m, r in ratios.items()))  # fmt: skip
        return chosen

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], p: str, gemm: Gemm) -> LlamaLayer:
        def fused(*names: str) -> Linear:
            """One larger GEMM instead of several small ones."""
            weight = torch.cat([w[f"{p}{n}.weight"] for n in names])
            biases = [w.get(f"{p}{n}.bias") for n in names]
            # NOTE: biases follow the checkpoint, not config flags (attention_bias, mlp_bias).
            bias = None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]
            return Linear(weight, bias, gemm)

        return LlamaLayer(
            input_norm=w[f"{p}input_layernorm.weight"],
            qkv=fused("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            o=fused("self_attn.o_proj"),
            post_norm=w[f"{p}post_attention_layernorm.weight"],
            gate_up=fused("mlp.gate_proj", "mlp.up_proj"),
            down=fused("mlp.down_proj"),
        )

    @classmethod
    def load(
        cls, model_dir: Path, device: torch.device, dtype: torch.dtype, gemm: Gemm = "auto"
    ) -> LlamaModel:
        cfg = LlamaConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        weights: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    weights[name] = f.get_tensor(name).to(dtype)
        return cls(cfg, weights, gemm)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: StepAttention,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] of every token of the step, before the final norm."""
        cfg = self.cfg
        n = input_ids.shape[0]
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(self.embed.dtype), emb.sin().to(self.embed.dtype)
        qk_heads = cfg.num_heads + cfg.num_kv_heads
        h = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(x)
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, qk_heads, cfg.head_dim), cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, self.q_size + self.kv_size :].view(n, cfg.num_kv_heads, cfg.head_dim)
            o = paged_attention(q, k, v, k_cache, v_cache, attn, self.scale)
            h = h + layer.o(o)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(hidden, self.norm, self.cfg.rms_norm_eps))
