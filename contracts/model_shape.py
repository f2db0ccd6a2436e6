"""A supported decoder's shape and math flags (`ModelShape`): what placement, validation, the
planner and the engine need of a checkpoint, read from its config.json by launcher/model_support.py.
No torch here."""
from __future__ import annotations

from dataclasses import dataclass

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq's padding rows)


@dataclass(frozen=True)
class ModelShape:
    """The numbers and the math of a supported decoder that placement, validation and the engine
    need. The defaults are Llama's; `rms_norm_eps` is the epsilon of every norm (RMSNorm or LayerNorm)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    family: str = "llama"               # llama | mistral | qwen2 | qwen3 | opt
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3: RMSNorm over each q and k head before RoPE
    layer_norm: bool = False            # LayerNorm with bias (OPT) instead of RMSNorm
    gated_mlp: bool = True              # SwiGLU (down(silu(gate) * up)) or down(act(up)) (OPT)
    activation: str = "silu"
    learned_positions: bool = False     # OPT: a learned position table (offset 2) instead of RoPE
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()  # the rope type's parameters, sorted
    sliding_window: int | None = None   # Mistral: a token sees the last `sliding_window` positions

    def rope(self) -> dict[str, float]:
        return dict(self.rope_params)

    def param_count(self) -> int:
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        attn = h * (2 * q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = (3 if self.gated_mlp else 2) * h * i + ((2 * i if self.gated_mlp else i) + h if self.mlp_bias else 0)
        norm = 2 * h if self.layer_norm else h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        positions = (self.max_position_embeddings + OPT_POSITION_OFFSET) * h if self.learned_positions else 0
        return self.num_layers * (attn + mlp + 2 * norm) + embed + positions + norm
