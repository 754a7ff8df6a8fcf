"""Cross-entropy and log-probabilities straight from the final hidden states, a chunk of tokens at a time.

The full path builds `batch x seq x vocab` logits, upcasts them to fp32, and keeps them (and their log-softmax,
and their gradient) until the backward pass: at a 128k vocabulary and 2048 tokens that is 1 GiB per row and per
copy, more than the rest of a small model's activations. Here the output head's projection runs per chunk of
trained tokens inside an autograd Function, so at most one chunk's logits exist at any time, in either pass:

- `chunked_loss_sum` (SFT, pretraining): the loss is one scalar, so its gradient with respect to each chunk's
  logits is known in the forward pass up to the scalar that backward brings. The gradients of the hidden states and
  of the head's weight are computed there, chunk by chunk, and backward only scales them (Liger's fused linear
  cross-entropy does the same on GPU). The same three matmuls as the full path: no recomputation.
- `chunked_token_logps` (preference objectives, online RL): each token's log-probability gets its own gradient, known
  only in backward, so backward recomputes each chunk's logits from the saved hidden states (one more matmul).

Only trained positions (label not -100) are projected at all: padding and masked prompts cost no head FLOPs, which
the full path spends on every position. Numerics follow the full path: the projection in the autocast dtype (or the
weights'), the softmax in fp32; the head's gradient is accumulated over chunks in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pandallm.data.encode import IGNORE_INDEX

# A chunk's fp32 logits hold at most this many elements (128 MiB): 256 tokens of a 128k vocabulary, the whole
# batch of a 3,000-piece one. Large enough that the per-chunk matmuls run at full speed on CPU and GPU alike.
CHUNK_ELEMENTS = 1 << 25


def chunk_tokens_for(vocab_size: int, chunk_tokens: int | None = None) -> int:
    """Tokens per chunk: `chunk_tokens` if given, else the power of two that keeps a chunk's logits within
    `CHUNK_ELEMENTS`."""
    if chunk_tokens is not None:
        return max(1, chunk_tokens)
    return 1 << max(0, (CHUNK_ELEMENTS // max(1, vocab_size)).bit_length() - 1)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as `lm_head` would under it), else the
    promotion of both operands (a bf16 model stays bf16)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position is scored against, (batch, seq): position t against token t + 1, the last position
    against nothing (-100). The labels are shifted, not the logits: slicing the logits would copy the largest tensor
    of the step (batch x seq x vocab)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def trained_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states of trained positions (n, hidden), their next tokens (n,), and their flat positions (n,)."""
    next_labels = shifted_labels(labels).flatten()
    positions = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.flatten(0, 1).index_select(0, positions), next_labels.index_select(0, positions), positions


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 for the softmax, as in `causal_lm_loss_sum` (an fp64 model keeps fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One chunk's logits (chunk, vocab) in at least fp32, the matmul in `dtype`."""
    return F.linear(hidden.to(dtype), weight).to(_softmax_dtype(dtype))


def _zeros_if(needed: bool, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return torch.zeros(shape, dtype=dtype, device=device) if needed else None


def _add_head_grads(
    dlogits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> None:
    """The gradients that a chunk's logits gradient (chunk, vocab; fp32) gives its hidden states (written in place
    into `grad_hidden`, a chunk-sized view) and the head's weight (added into the fp32 `grad_weight`)."""
    dlogits = dlogits.to(weight.dtype)
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden)
    if grad_weight is not None:
        if grad_weight.dtype == weight.dtype:
            grad_weight.addmm_(dlogits.t(), hidden.to(weight.dtype))
        else:  # a bf16 matmul, accumulated over the chunks in fp32
            grad_weight += (dlogits.t() @ hidden.to(weight.dtype)).float()


class _LossSum(torch.autograd.Function):
    """Summed cross-entropy of `hidden` (n, h) projected by `weight` (v, h) against `targets` (n,); gradients computed
    in forward (see the module's docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, dtype: torch.dtype):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        matmul_weight = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        grad_weight = _zeros_if(need_weight, weight.shape, _softmax_dtype(dtype), weight.device)
        loss = torch.zeros((), dtype=_softmax_dtype(dtype), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = _chunk_logits(h, matmul_weight, dtype)
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                # d(sum of -log softmax[t]) / d logits = softmax - one_hot(t), made in place over the logits.
                dlogits = logits.sub_(lse[:, None]).exp_()
                dlogits[torch.arange(len(t), device=t.device), t] -= 1
                chunk_grad = grad_hidden[start : start + chunk_tokens] if need_hidden else None
                _add_head_grads(dlogits, h, matmul_weight, chunk_grad, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None


class _TokenLogps(torch.autograd.Function):
    """Log-probabilities (n,) of `targets` under `hidden` (n, h) projected by `weight` (v, h), and with `entropy` the
    entropy of each distribution (n,; no gradient, else empty); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, dtype: torch.dtype, entropy: bool = False):
        matmul_weight = weight.to(dtype)
        logps = torch.empty(hidden.shape[0], dtype=_softmax_dtype(dtype), device=hidden.device)
        lses = torch.empty_like(logps)
        entropies = torch.empty(hidden.shape[0] if entropy else 0, dtype=logps.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            logits = _chunk_logits(hidden[start:end], matmul_weight, dtype)
            lses[start:end] = logits.logsumexp(-1)
            logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lses[start:end]
            if entropy:  # H = lse - sum(p * logits), from the chunk's logits while they exist
                probabilities = (logits - lses[start:end, None]).exp_()
                entropies[start:end] = lses[start:end] - (probabilities * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropies):
        hidden, weight, targets, lses = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        matmul_weight = weight.to(ctx.dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=ctx.dtype, device=hidden.device) if need_hidden else None
        grad_weight = _zeros_if(need_weight, weight.shape, _softmax_dtype(ctx.dtype), weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            h, t, g = hidden[start:end], targets[start:end], grad_logps[start:end]
            # d logp[t] / d logits = one_hot(t) - softmax, times each token's incoming gradient.
            dlogits = _chunk_logits(h, matmul_weight, ctx.dtype).sub_(lses[start:end, None]).exp_()
            dlogits.mul_(-g[:, None])
            dlogits[torch.arange(len(t), device=t.device), t] += g
            chunk_grad = grad_hidden[start:end] if need_hidden else None
            _add_head_grads(dlogits, h, matmul_weight, chunk_grad, grad_weight)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss_sum` of the logits `hidden @ weight.T`, without building them.

    Shapes: hidden (batch, seq, hidden) the decoder's final (normed) states, weight (vocab, hidden) the output head's,
    labels (batch, seq); label -100 is not trained. Returns the summed fp32 loss and the number of trained tokens.
    """
    trained_hidden, targets, _ = trained_positions(hidden, labels)
    if not torch.is_grad_enabled():
        # An autograd Function sees its inputs' requires_grad even under no_grad: evaluation would compute gradients.
        trained_hidden, weight = trained_hidden.detach(), weight.detach()
    loss_sum = _LossSum.apply(
        trained_hidden,
        weight,
        targets,
        chunk_tokens_for(weight.shape[0], chunk_tokens),
        _compute_dtype(hidden, weight),
    )
    return loss_sum, torch.tensor(len(targets), device=labels.device)


def chunked_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Each position's log-probability of its next token (batch, seq), fp32; 0 where that token is not trained."""
    return chunked_token_logps_and_entropies(hidden, weight, labels, chunk_tokens, entropy=False)[0]


def chunked_token_logps_and_entropies(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_token_logps`, and the entropy of each trained position's next-token distribution (batch, seq; no
    gradient; 0 elsewhere) from the same chunks of logits (online RL logs it)."""
    trained_hidden, targets, positions = trained_positions(hidden, labels)
    logps, entropies = _TokenLogps.apply(
        trained_hidden,
        weight,
        targets,
        chunk_tokens_for(weight.shape[0], chunk_tokens),
        _compute_dtype(hidden, weight),
        entropy,
    )

    def dense(values: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(labels.numel(), dtype=logps.dtype, device=logps.device)
        return flat.index_put((positions,), values).view(labels.shape)

    return dense(logps), dense(entropies) if entropy else torch.zeros_like(labels, dtype=logps.dtype)
