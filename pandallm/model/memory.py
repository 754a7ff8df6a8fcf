"""How much memory a training run needs per device, before it runs (LLMBox's gpu_calculator, for pandallm's runs).

Counted from the model's shape and the run's settings, in bytes:

- weights: every parameter in the dtype it is stored in (fp32 under `32-true` and `*-mixed`, 2 bytes under
  `*-true` half precision, NF4 / int8 for a quantized LoRA base), plus the bf16 copies autocast keeps of the
  linear weights for the backward pass under `*-mixed`;
- gradients and optimizer state, of the trainable parameters only (LoRA: the adapters and `modules_to_save`);
- activations: the tensors autograd saves for the backward pass, counted op by op for the LLaMA decoder layer as
  transformers writes it with `sdpa` attention (norms, projections, attention, SwiGLU); with gradient checkpointing,
  the layer inputs plus one layer's activations;
- logits and loss: the logits, their fp32 copy for the softmax and its gradient; with the chunked loss
  (`model.loss_impl`), one chunk's of them, the head's fp32 gradient and the hidden states' gradient;
- sharding (DeepSpeed ZeRO stages, FSDP) divides weights, gradients and optimizer state by the ranks that share
  them, and offloading moves optimizer state (and parameters) to CPU memory.

Not counted: the CUDA context and the allocator's fragmentation (a few hundred MiB to a few GiB), communication
buckets, data-loader buffers. The estimate is checked against what autograd saves on the CPU and against the GPU
peaks in benchmarks/RESULTS.md (tests/model/test_memory.py): within 15% on every run recorded there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GIB = 1024**3
Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp_full", "fsdp_grad_op"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The model's dimensions (from a `LlamaConfig`)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def of(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.vocab_size,
            config.num_attention_heads,
            kv_heads,
            head_dim,
            tied,
        )

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a decoder layer's linear layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]

    @property
    def linear_per_layer(self) -> int:
        return sum(a * b for a, b in map(self.projection, PROJECTIONS))

    @property
    def embeddings(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)  # embed_tokens and lm_head

    @property
    def parameters(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.linear_per_layer + self.embeddings + norms


@dataclass(frozen=True)
class Run:
    """What decides the memory of a training step on one device."""

    shape: Shape
    micro_batch: int
    seq_len: int
    precision: str = "bf16-mixed"
    lora_r: int | None = None  # None: every weight is trained
    lora_targets: tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    quant_bits: int | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    sharding: Sharding = "none"
    world_size: int = 1
    offload_optimizer: bool = False
    offload_parameters: bool = False
    deepspeed: bool = False  # half-precision weights and gradients, an fp32 master copy beside the optimizer state
    half_compute: bool = False  # the model runs in half precision without autocast (DeepSpeed; FSDP's mixed precision)
    device: str = "cuda"  # dropout keeps a one-byte mask on CUDA, a mask in the input's dtype on the CPU
    loss_chunk_tokens: int | None = None  # the chunked loss's tokens per chunk; None: the full logits

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Estimate:
    """Bytes per device by what holds them, and bytes moved to CPU memory by offloading."""

    parts: dict[str, float] = field(default_factory=dict)
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def report(self, device_gib: float | None = None) -> str:
        lines = [f"  {name:<22} {size / GIB:9.2f} GiB" for name, size in self.parts.items()]
        lines.append(f"  {'total per device':<22} {self.total / GIB:9.2f} GiB")
        if self.cpu:
            lines.append(f"  {'offloaded to CPU':<22} {self.cpu / GIB:9.2f} GiB (per rank)")
        if device_gib is not None:
            verdict = "fits" if self.total <= device_gib * GIB else "does NOT fit"
            lines.append(f"  {verdict} in {device_gib:g} GiB per device ({self.total / (device_gib * GIB):.0%} of it)")
        return "\n".join(lines)


def _dtype_bytes(run: Run) -> tuple[int, int, bool]:
    """(compute bytes, bytes of the hidden stream between layers, whether autocast casts each op's inputs)."""
    if run.precision.startswith("32") or run.precision == "64":
        return 4, 4, False
    if _half_weights(run) or run.deepspeed or run.half_compute:
        return 2, 2, False
    return 2, 4, True  # *-mixed: fp32 weights and residual stream, bf16 / fp16 matmuls


def activation_bytes_per_token(run: Run) -> float:
    """What autograd saves per token for one decoder layer (see the module docstring)."""
    s = run.shape
    a, r, cast = _dtype_bytes(run)
    full = run.lora_r is None
    adapted = set(PROJECTIONS if full else run.lora_targets)
    dropout = not full and run.lora_dropout > 0
    h, i = s.hidden, s.intermediate
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

    mask = 1 if run.device == "cuda" else a

    def inputs(consumers: tuple[str, ...], features: int, in_bytes: int, saved_already: bool = False) -> float:
        """The input of the projections that save it: a trained weight's, or an adapter's (a frozen weight's
        gradient is not computed, so a frozen layer saves no input); and each adapter's rank-r hidden state."""
        needing = sum(c in adapted for c in consumers)
        adapters = 0 if full else needing * run.lora_r * a
        if not needing:
            return 0
        if dropout:  # each adapter: its dropout's mask, and the dropped input its lora_A saves (cast to compute)
            return adapters + needing * (a + mask) * features
        if cast and in_bytes != a:  # autocast casts the input once per projection, and each keeps its copy
            return adapters + needing * a * features
        return adapters + (0 if saved_already else in_bytes * features)  # one tensor, shared

    def norm(consumers: tuple[str, ...]) -> float:
        # RMSNorm upcasts its input to fp32 (saved for pow and mul), and keeps the normalized input for its
        # weight's gradient when the weight trains; its output is saved by the projections after it.
        return 4 * h + (r * h if full else 0) + inputs(consumers, h, r)

    total = norm(("q_proj", "k_proj", "v_proj"))
    total += a * (2 * q + 2 * kv)  # sdpa: rotated q and k, v, and its output (rotary multiplies by constants)
    total += inputs(("o_proj",), q, a, saved_already=True)  # sdpa's output, laid out as o_proj reads it
    total += norm(("gate_proj", "up_proj"))
    total += 3 * a * i  # SwiGLU: silu's input, silu's output and up's output for the product
    total += inputs(("down_proj",), i, a)
    return total


def activations(run: Run) -> float:
    s = run.shape
    _, r, _ = _dtype_bytes(run)
    per_layer = activation_bytes_per_token(run) * run.tokens
    if run.gradient_checkpointing:  # each layer's input, and one layer recomputed at a time in the backward pass
        return s.layers * r * s.hidden * run.tokens + per_layer
    return s.layers * per_layer


def logits_and_loss(run: Run) -> float:
    a, _, _ = _dtype_bytes(run)
    s = run.shape
    if run.loss_chunk_tokens is None:
        return run.tokens * s.vocab * (a + 4 + 4)  # the logits, their fp32 copy (log-softmax), its gradient
    # pandallm.model.chunked_loss: one chunk's logits, fp32 softmax and gradient in the matmul's dtype; the trained
    # positions' hidden states and their gradient; the head's gradient accumulated in fp32 when the head trains.
    chunk = min(run.tokens, run.loss_chunk_tokens) * s.vocab * (a + 4 + a)
    head_trains = run.lora_r is None or "lm_head" in run.modules_to_save
    return chunk + run.tokens * s.hidden * 2 * a + (4 * s.vocab * s.hidden if head_trains else 0)


def _trainable(run: Run) -> float:
    s = run.shape
    if run.lora_r is None:
        return s.parameters
    adapters = s.layers * sum(run.lora_r * sum(s.projection(t)) for t in run.lora_targets)
    saved = sum(s.vocab * s.hidden for m in run.modules_to_save if m in ("embed_tokens", "lm_head"))
    return adapters + saved


def _half_weights(run: Run) -> bool:
    """Whether the weights themselves are half precision (`bf16-true`, `16-true`)."""
    return run.precision in ("bf16-true", "16-true")


def _stored_bytes(run: Run) -> int:
    """Bytes per stored weight (and gradient): fp32 under 32-true and *-mixed (FSDP's shards too), half precision
    under *-true and DeepSpeed (whose fp32 master copy is counted with the optimizer state)."""
    return 2 if _half_weights(run) or run.deepspeed else 4


def _base_weights(run: Run) -> float:
    s = run.shape
    stored = _stored_bytes(run)
    if run.quant_bits is None or run.lora_r is None:
        return s.parameters * stored
    linear = s.layers * s.linear_per_layer
    per_weight = 0.5 + 1 / 64 + 4 / (64 * 256) if run.quant_bits == 4 else 1 + 4 / 4096  # NF4 + double-quant scales
    # k-bit preparation keeps the weights it does not quantize (embeddings, lm_head, norms) in fp32.
    return linear * per_weight + (s.parameters - linear) * 4


def estimate(run: Run) -> Estimate:
    s = run.shape
    a, _, cast = _dtype_bytes(run)
    n = max(run.world_size, 1)
    zero = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp_full": 3, "fsdp_grad_op": 2}.get(run.sharding, 0)
    trainable = _trainable(run)
    # AdamW / LAMB: two moments, in fp32 (in the parameters' dtype under *-true); 8-bit optimizers: one byte each.
    # DeepSpeed keeps an fp32 master copy of the half-precision weights with the optimizer state.
    stored = _stored_bytes(run)
    state_bytes = 1 if run.optimizer.endswith("8bit") else (2 if _half_weights(run) else 4)
    optimizer = trainable * (2 * state_bytes + (4 if run.deepspeed else 0))
    gradients = trainable * stored
    weights = _base_weights(run)
    if run.lora_r is not None:
        weights += trainable * stored
    parts: dict[str, float] = {}
    shard = {1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}.get(zero, (1, 1, 1))
    parts["weights"] = 0.0 if run.offload_parameters else weights / shard[0]
    if zero == 3:  # the gathered parameters of the layer being computed (and the next one, prefetched)
        parts["weights"] += 2 * s.linear_per_layer * a
    if cast and run.quant_bits is None:
        # The bf16 copies of the linear weights: autocast caches those that train for the whole forward pass, and
        # each matmul keeps its copy of a frozen one for the input's gradient (recomputed under checkpointing).
        linear = s.layers * s.linear_per_layer + s.vocab * s.hidden
        frozen = 0 if run.lora_r is None else linear - (s.vocab * s.hidden if "lm_head" in run.modules_to_save else 0)
        parts["autocast weight copies"] = 2 * (linear - frozen * run.gradient_checkpointing)
    parts["gradients"] = gradients / shard[1]
    if run.sharding == "ddp" and n > 1:
        parts["gradients"] += gradients  # DDP's buckets hold a second copy to all-reduce
    cpu = 0.0
    if run.offload_optimizer:
        cpu += optimizer / shard[2]
    else:
        parts["optimizer state"] = optimizer / shard[2]
    if run.offload_parameters:
        cpu += weights / shard[0]
    parts["activations"] = activations(run)
    parts["logits and loss"] = logits_and_loss(run)
    return Estimate(parts, cpu)
