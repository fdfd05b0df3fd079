"""The attribution engine: causal-trace grids ESTIMATED from one forward and one backward pass.

Attribution patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024, "AtP*") replaces each
restored run by the first-order Taylor term around the corrupted run. With z the state restored
(block l's output at token t for `hidden`; the MLP or attention output of layer j at token t),
z* its clean value, z_s its value in corrupted copy s and p_s that copy's P(answer):

    p_s(z_s -> z*) ~ p_s + (z* - z_s) . dp_s/dz |_{z_s}                        (linearize="prob")

A window kind restores the outputs of the layers j in window(l) together; to first order the
effects add, so the estimate sums the per-layer terms over the window. The grid cell is the
mean over the S copies, as in the exact trace. Every gradient comes from one backward pass of
sum_s log p_s (the copies are independent rows), after a forward pass of the S corrupted copies
that records every state; the clean run is one more forward pass. Noise, read-out (`Readout`,
the answer's first token or the whole answer), the window rule and the result types are the
exact engines' (`common.py`), so the grids are drop-in estimates of theirs. Cells before the
subject are the corrupted probability, as there (restoring them changes nothing).

Departures and choices, named:

- `linearize="logprob"` linearizes log p instead and maps back, p_s * exp((z* - z_s) .
  d log p_s/dz), clipped at 1. The read-out softmax is the saturating non-linearity that
  matters most here: the corrupted answer is improbable (p ~ 0.01 where the clean p ~ 0.3), where
  p is convex in the logits and the linear term underestimates every large restoration. Log p
  is linear in the answer logit up to the normaliser. Same gradient, no extra cost. It is not
  one of AtP*'s fixes.
- AtP*'s QK fix is NOT applied. It computes exactly how a patched query or key node changes its
  own attention softmax, and linearizes only after it. Here the restored nodes are residual
  states and MLP / attention outputs, which reach every later attention softmax through a norm
  and the Q/K/V projections of each later layer and position; an exact softmax per later layer
  and restored cell is the cost of the exact trace. So attention saturation downstream of a
  restored state stays in the first-order error (measured: scripts/attribution_agreement.py).
- AtP*'s GradDrop (a backward pass per layer with that layer's gradient dropped, against
  cancelling paths) is not applied either: it multiplies the cost by the number of layers.
- The severed-path comparison (hidden state at the last subject token with the later MLP or
  attention outputs at that token frozen at their corrupted values) takes the gradient of a
  corrupted run in which those outputs at that token are detached: the gradient at block l's
  output only flows through the layers above l, so one such run gives every layer's estimate
  with exactly those paths cut. Two more forward and backward passes.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.core.hooks import forward_hooks, main_output
from pipeline.core.models import LoadedModel
from pipeline.core.patching.common import (
    KINDS,
    SEVERED,
    Readout,
    answer_log_prob,
    corrupt_embeddings,
    window_layers,
)

LINEARIZE = ("prob", "logprob")
MODULES = {"hidden": "block", "mlp": "mlp", "attn": "attn"}  # kind -> the module it restores


def _recorder(store: list, layer: int):
    def hook(module, inputs, output):
        store[layer] = main_output(output)

    return hook


def _detach_at(token: int):
    """A hook cutting the gradient through the module's output at `token` (values unchanged)."""

    def hook(module, inputs, output):
        hidden = main_output(output)
        keep = torch.ones_like(hidden[:1, :, :1])
        keep[:, token] = 0
        frozen = hidden * keep + hidden.detach() * (1 - keep)
        return (frozen, *output[1:]) if isinstance(output, tuple) else frozen

    return hook


def _leaf(module, inputs, output):
    """Make the (noised) embeddings where the backward pass starts from (weights need none)."""
    return output.detach().requires_grad_(True)


class AttributionTracer:
    """The clean run and the corrupted run with its gradients, and the estimates from them.

    The same interface as `FastTracer` (`clean`, `corrupted`, `grid(kind, window)`,
    `severed()`), so `trace_all_kinds` and `trace_severed` take either. `linearize` may be
    changed between calls: both read the same gradients."""

    def __init__(
        self,
        lm: LoadedModel,
        readout: Readout,
        span: tuple[int, int],
        noise: torch.Tensor,
        linearize: str = "prob",
    ):
        if linearize not in LINEARIZE:
            raise ValueError(f"linearize must be one of {LINEARIZE}, got '{linearize}'")
        self.lm, self.readout, self.span, self.noise = lm, readout, span, noise
        self.linearize, self.n_layers = linearize, lm.n_layers
        self.sequence = torch.tensor(readout.sequence, device=lm.device)
        with torch.no_grad():
            log_p, self.clean_states = self._run(self.sequence[None], noise=None)
        self.clean = log_p.exp()[0].item()
        self.log_p, self.terms = self._gradient_terms()
        self._severed: dict[str, tuple] = {}
        self.corrupted = self.log_p.exp().mean().item()

    def _run(self, input_ids: torch.Tensor, noise: torch.Tensor | None, detach=None):
        """One forward pass: log P(answer) per row and every kind's states per layer
        (rows, tokens, hidden). `detach`: (kind, token) whose outputs pass no gradient."""
        L = self.n_layers
        states = {kind: [None] * L for kind in KINDS}
        hooks = [
            (self.lm.module(MODULES[kind], j), _recorder(states[kind], j))
            for kind in KINDS
            for j in range(L)
        ]
        if detach is not None:
            kind, token = detach
            hooks = [(self.lm.module(kind, j), _detach_at(token)) for j in range(L)] + hooks
        if noise is not None:  # the exact engines' noise hook, then a leaf to differentiate
            hooks = [(self.lm.module("embed"), _leaf), *hooks]
        noising = contextlib.nullcontext()
        if noise is not None:
            noising = corrupt_embeddings(self.lm, self.span, noise, 0)
        with noising, forward_hooks(hooks):
            base = self.lm.model.base_model(input_ids=input_ids, use_cache=False)
        hidden = base.last_hidden_state[:, list(self.readout.positions)]  # after the final norm
        logits = self.lm.module("unembed")(hidden)
        return answer_log_prob(logits, self.readout.targets), states

    def _gradient_terms(self, detach=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """log p_s (S,), and per kind (z* - z_s) . d log p_s / dz, (S, tokens, layers)."""
        copies = self.noise.shape[0]
        with torch.enable_grad():
            ids = self.sequence[None].expand(copies, -1)
            log_p, states = self._run(ids, self.noise, detach)
            kinds = [kind for kind in KINDS if detach is None or kind == "hidden"]
            flat = [state for kind in kinds for state in states[kind]]
            grads = torch.autograd.grad(log_p.sum(), flat, allow_unused=True)
        terms, L, n_prompt = {}, self.n_layers, self.readout.n_prompt
        for k, kind in enumerate(kinds):
            columns = []
            for j in range(L):
                grad = grads[k * L + j]
                state = states[kind][j].detach()
                delta = self.clean_states[kind][j].float() - state.float()
                term = (delta * grad.float()).sum(-1) if grad is not None else delta[..., 0] * 0
                columns.append(term[:, :n_prompt])
            terms[kind] = torch.stack(columns, dim=-1)
        return log_p.detach().float(), terms

    def _estimate(self, log_p: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        """Mean over copies of the estimated restored P(answer); `term` (S, ...) in log p."""
        p = log_p.exp().view(-1, *[1] * (term.ndim - 1))
        if self.linearize == "prob":
            return (p + p * term).mean(0)  # dp = p dlog p
        return (p * term.exp()).clamp(max=1.0).mean(0)

    def grid(self, kind: str, window: int = 10) -> torch.Tensor:
        """(prompt tokens, layers) estimated restored P(answer); windows summed per copy."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        term = self.terms[kind]
        if kind != "hidden":
            L = self.n_layers
            cumulative = torch.nn.functional.pad(term.cumsum(-1), (1, 0))
            starts = torch.tensor([window_layers(j, window, L).start for j in range(L)])
            stops = torch.tensor([window_layers(j, window, L).stop for j in range(L)])
            term = cumulative[..., stops] - cumulative[..., starts]
        grid = self._estimate(self.log_p, term)
        grid[: self.span[0]] = self.corrupted  # restoring clean-equal states changes nothing
        return grid.cpu()

    def severed(self) -> dict[str, torch.Tensor]:
        """Estimated hidden restoration at the last subject token, later MLP / attn frozen."""
        token = self.span[1] - 1
        out = {}
        for name in SEVERED:
            if name not in self._severed:  # the gradient runs, once (either linearization)
                detach = None if name == "none" else (name, token)
                self._severed[name] = (
                    self._gradient_terms(detach) if detach else (self.log_p, self.terms)
                )
            log_p, terms = self._severed[name]
            out[name] = self._estimate(log_p, terms["hidden"][:, token]).cpu()
        return out
