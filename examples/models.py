"""Example models for mtc, written in plain PyTorch.

Each model's ``forward(input_ids, labels)`` returns the scalar training loss, the
way Hugging Face models do when given labels, so one graph covers the whole
training step's forward pass. The code avoids data-dependent Python control
flow so that both ``torch.fx`` (tracing through every module) and
``torch.export`` (non-strict) capture it whole.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Cross-entropy in float32: a softmax over a large vocabulary loses too much in bf16.
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


def init_weights(module: nn.Module) -> None:
    """Initialise one module's own parameters and buffers (not its children's).

    The models apply it to every module; mtc.compile(..., init=init_weights) applies it block by block
    to a model built on the meta device. nn.init is a no-op on meta tensors.
    """
    # Small weights: with GPT-2's tied head, nn.Embedding's default N(0, 1) would give huge initial
    # logits (a loss near 40 instead of ln(vocab)).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, nn.LayerNorm):
        module.reset_parameters()
    elif isinstance(module, Llama):
        with torch.no_grad():
            module.inv_freq.copy_(rope_inv_freq(module.cfg.hidden // module.cfg.heads, module.cfg.rope_theta))


# --------------------------------------------------------------------------- Llama


@dataclass
class LlamaConfig:
    vocab_size: int
    """Number of token ids the embedding and the output head cover."""
    hidden: int
    """Width of the residual stream."""
    layers: int
    """Number of transformer blocks."""
    heads: int
    """Number of query heads; must divide ``hidden``."""
    kv_heads: int
    """Number of key/value heads (grouped-query attention); must divide ``heads``."""
    intermediate: int
    """Width of the SwiGLU MLP's hidden layer."""
    rope_theta: float = 500000.0
    """Base of the rotary position embedding's frequencies."""
    norm_eps: float = 1e-5
    """Epsilon added to the mean square in RMSNorm."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so low-precision inputs keep their accuracy.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse rotary frequencies, one per pair of channels (float32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.hidden % cfg.heads or cfg.heads % cfg.kv_heads:
            raise ValueError(
                f"LlamaConfig: heads={cfg.heads} must divide hidden={cfg.hidden} "
                f"and kv_heads={cfg.kv_heads} must divide heads"
            )
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.hidden // cfg.heads
        kv_width = cfg.kv_heads * self.head_dim
        self.q = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.v = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.o = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        # (B, T, heads * D) -> (B, heads, T, D); static sizes keep tracing shape-free.
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = _apply_rope(self._split_heads(self.q(x), self.heads), cos, sin)
        k = _apply_rope(self._split_heads(self.k(x), self.kv_heads), cos, sin)
        v = self._split_heads(self.v(x), self.kv_heads)
        # Each key/value head serves a contiguous group of query heads.
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).flatten(2))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Residual adds live inside the block so a block is a self-contained unit.
        h = x + self.attn(self.norm1(x), cos, sin)
        return h + self.mlp(self.norm2(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList([LlamaBlock(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        # Derived from the config, so it need not be saved in checkpoints.
        inv_freq = rope_inv_freq(cfg.hidden // cfg.heads, cfg.rope_theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        # Rotary tables are computed once here and shared by every block.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return _loss(self.head(self.norm(h)), labels)


# --------------------------------------------------------------------------- GPT-2


@dataclass
class GPT2Config:
    vocab_size: int
    """Number of token ids the embedding (and tied head) cover."""
    hidden: int
    """Width of the residual stream."""
    layers: int
    """Number of transformer blocks."""
    heads: int
    """Number of attention heads; must divide ``hidden``."""
    max_seq: int
    """Longest sequence the learned position embedding covers."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual branches."""
    qkv_bias: bool = True
    """Bias on the fused query/key/value projection, as in GPT-2. The key part's gradient is exactly
    zero in exact arithmetic (softmax ignores a shift shared by all keys), so AdamW turns its
    rounding noise (~1e-11) into real updates that differ between any two summation orders."""


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"GPT2Config: heads={cfg.heads} must divide hidden={cfg.hidden}")
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, 3 * hidden) -> (3, B, heads, T, D); indexing avoids unpacking a traced value.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.proj(out.transpose(1, 2).flatten(2))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.proj = nn.Linear(4 * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = GPT2Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = GPT2MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.drop(self.attn(self.ln1(x)))
        return h + self.drop(self.mlp(self.ln2(h)))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.max_seq, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([GPT2Block(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        # Tied: the output head shares the token embedding's storage and gradient.
        self.head.weight = self.wte.weight
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            h = block(h)
        return _loss(self.head(self.ln_f(h)), labels)


# --------------------------------------------------------------------------- MLPStack


class MLPStack(nn.Module):
    """A small model with no repeated block structure, for tests."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 32)
        self.proj = nn.Linear(32, 48)
        self.norm = nn.LayerNorm(48)
        self.mix = nn.Linear(48, 40)
        self.head = nn.Linear(40, vocab_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        h = F.gelu(self.mix(self.norm(h)))
        return _loss(self.head(h), labels)


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, LlamaConfig] = {
    # Byte-level vocabulary, so it trains on the embedded corpus without a tokenizer.
    "tiny": LlamaConfig(
        vocab_size=256, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384
    ),
    "125m": LlamaConfig(
        vocab_size=32000, hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048
    ),
    # Llama-3.2-1B shape (with an untied head).
    "1b": LlamaConfig(
        vocab_size=128256, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192
    ),
    # Llama-3.2-3B shape (with an untied head).
    "3b": LlamaConfig(
        vocab_size=128256, hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192
    ),
    # Llama-3.2-3B blocks with an 8k vocabulary: the blocks' activations, not the loss's logits, are what
    # fills the device at large batches (token chunks then help; a fused loss will do the same for "3b").
    "3b-8k": LlamaConfig(
        vocab_size=8192, hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192
    ),
    # Llama-3-8B shape.
    "8b": LlamaConfig(
        vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336
    ),
    # The shapes of the MegaTrain paper's runs (arXiv 2604.05091), for sizing a machine with `mtc plan`:
    # Qwen2.5 widths, depths, heads, vocabularies and rope bases in Llama blocks (Qwen2.5's q/k/v
    # biases, a few hundred thousand parameters, left out; untied heads).
    "qwen2.5-14b": LlamaConfig(
        vocab_size=152064, hidden=5120, layers=48, heads=40, kv_heads=8, intermediate=13824,
        rope_theta=1e6, norm_eps=1e-6,
    ),
    "qwen2.5-32b": LlamaConfig(
        vocab_size=152064, hidden=5120, layers=64, heads=40, kv_heads=8, intermediate=27648,
        rope_theta=1e6, norm_eps=1e-6,
    ),
    "qwen2.5-72b": LlamaConfig(
        vocab_size=152064, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568,
        rope_theta=1e6, norm_eps=1e-6,
    ),
    # A 118.7B Llama-style decoder standing in for the paper's "120B" (whose shape it does not give).
    "120b": LlamaConfig(
        vocab_size=152064, hidden=10240, layers=104, heads=80, kv_heads=8, intermediate=28672,
        rope_theta=1e6,
    ),
}


def preset_config(preset: str) -> LlamaConfig:
    """The shape a preset names: a key of PRESETS, or `name:layers` for that shape with another number of
    blocks (`8b:40`, a 9.8B model of Llama-3-8B blocks), for finding the largest model a machine trains."""
    name, colon, layers = preset.partition(":")
    if name not in PRESETS or (colon and not (layers.isdigit() and int(layers) > 0)):
        raise ValueError(f"preset={preset!r} is not known; expected one of {', '.join(sorted(PRESETS))}, "
                         f"or one of them with another number of blocks, as 8b:40")
    return dataclasses.replace(PRESETS[name], layers=int(layers)) if layers else PRESETS[name]


def build(preset: str, device: str | torch.device = "cpu") -> Llama:
    """Build the Llama preset named ``preset`` (see preset_config) with its tensors created on ``device``.

    ``device="meta"`` builds the structure without allocating any storage.
    """
    config = preset_config(preset)
    with torch.device(device):
        return Llama(config)


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements, counting tied (shared) parameters once."""
    # Module.parameters() already yields each shared Parameter only once.
    return sum(p.numel() for p in model.parameters())


def random_batches(preset: str, shape: tuple[int, int], count: int, device, seed: int = 0) -> list[tuple]:
    """`count` (input_ids, labels) pairs of `shape` (sequences, tokens) drawn uniformly from the preset's
    vocabulary: what benchmarks and calibration time steps on."""
    generator = torch.Generator().manual_seed(seed)
    vocab = preset_config(preset).vocab_size
    return [tuple(torch.randint(0, vocab, shape, generator=generator).to(device) for _ in range(2))
            for _ in range(count)]
