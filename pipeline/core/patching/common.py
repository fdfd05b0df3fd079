"""What both tracing engines share: noise, restoration windows, the answer read-out, results.

Keeping these in one place is what makes the two engines comparable: they corrupt with the same
hook, read the same positions and turn logits into probabilities with the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pipeline.core.hooks import forward_hooks
from pipeline.core.models import LoadedModel
from pipeline.core.tokens import encode, subject_span

KINDS = ("hidden", "mlp", "attn")
DISTRIBUTIONS = ("gaussian", "uniform")
SEVERED = ("none", "mlp", "attn")


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored together for an `mlp`/`attn` trace centred at `layer`, clipped at the ends.

    The original code's `range(max(0, i - w // 2), min(L, i - (-w // 2)))`: for w=10, [i-5, i+5).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def make_noise(
    generator: torch.Generator,
    copies: int,
    n_tokens: int,
    hidden: int,
    scale: float,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Noise for the subject embeddings, (copies, n_tokens, hidden), float32 on the generator's device.

    Gaussian is N(0, 1) and uniform is U(-1, 1), both times `scale`, as in the original code.
    """
    shape = (copies, n_tokens, hidden)
    device = generator.device
    if distribution == "gaussian":
        base = torch.randn(shape, generator=generator, device=device)
    elif distribution == "uniform":
        base = torch.rand(shape, generator=generator, device=device) * 2 - 1
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got '{distribution}'")
    return base * scale


@torch.no_grad()
def embedding_std(lm: LoadedModel, prompts_and_subjects: Iterable[tuple[str, str]]) -> float:
    """Standard deviation of the input embeddings over all subject tokens of the given prompts.

    The paper's noise scale is 3 times this value (3 x std over the subjects of the dataset).
    """
    embed = lm.module("embed")
    pieces = []
    for prompt, subject in prompts_and_subjects:
        start, end = subject_span(lm.tokenizer, prompt, subject)
        ids = encode(lm.tokenizer, prompt)[start:end]
        pieces.append(embed(torch.tensor(ids, device=lm.device)).float().flatten())
    if not pieces:
        raise ValueError("embedding_std needs at least one (prompt, subject) pair")
    return torch.cat(pieces).std().item()


def hidden_size(lm: LoadedModel) -> int:
    return int(lm.module("embed").weight.shape[1])


@dataclass(frozen=True)
class Readout:
    """The token sequence that is run, and where the answer is read off it.

    First-token mode runs the prompt and reads its last position. Whole-answer mode appends all but
    the last answer token (teacher forcing) and reads one position per answer token.
    """

    sequence: tuple[int, ...]
    n_prompt: int
    positions: tuple[int, ...]
    targets: tuple[int, ...]

    @classmethod
    def build(
        cls, prompt_ids: Sequence[int], answer_ids: Sequence[int], whole_answer: bool = False
    ) -> Readout:
        prompt_ids, answer_ids = [int(i) for i in prompt_ids], [int(i) for i in answer_ids]
        if not prompt_ids or not answer_ids:
            raise ValueError("prompt_ids and answer_ids must not be empty")
        if not whole_answer:
            answer_ids = answer_ids[:1]
        sequence = prompt_ids + answer_ids[:-1]
        first = len(prompt_ids) - 1
        return cls(
            tuple(sequence),
            len(prompt_ids),
            tuple(range(first, first + len(answer_ids))),
            tuple(answer_ids),
        )


def answer_log_prob(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """(rows, read positions, vocab) logits -> (rows,) mean log p(target), in float32."""
    log_probs = logits.float().log_softmax(-1)
    index = torch.as_tensor(targets, device=logits.device)
    return log_probs[:, torch.arange(len(targets), device=logits.device), index].mean(-1)


def answer_prob(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """(rows, read positions, vocab) logits -> (rows,) exp(mean log p(target)), in float32.

    With one target this is the softmax probability of the answer's first token.
    """
    return answer_log_prob(logits, targets).exp()


def corrupt_embeddings(
    lm: LoadedModel, span: tuple[int, int], noise: torch.Tensor, first_row: int
) -> contextlib.AbstractContextManager:
    """Add `noise` to the subject tokens' input embeddings of rows `first_row`.. (a hook)."""
    start, end = span

    def add_noise(module, inputs, output):
        output[first_row:, start:end] += noise.to(output)
        return output

    return forward_hooks([(lm.module("embed"), add_noise)])


@dataclass
class TraceResult:
    """One causal trace: P(answer) clean, corrupted, and restored at each (token, layer).

    `restored[t, l]` restores the clean `kind` state at token t: the block output of layer l
    (`hidden`), or the MLP / attention outputs over the window of layers centred at l.
    """

    kind: str
    window: int
    clean: float
    corrupted: float
    restored: torch.Tensor  # (prompt tokens, layers), float32
    subject_span: tuple[int, int]
    answer_ids: tuple[int, ...]

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect: how much restoring the state brings the answer back."""
        return self.restored - self.corrupted


@dataclass
class SeveredResult:
    """Hidden-state restoration at the last subject token, with later MLP/attn paths severed.

    `restored[name][l]`: P(answer) when block l's output at `token` is restored and, for name
    "mlp" / "attn", the MLP / attention outputs of layers above l at `token` stay corrupted.
    """

    token: int
    clean: float
    corrupted: float
    restored: dict[str, torch.Tensor]  # name in SEVERED -> (layers,)

    def effect(self, severed: str = "none") -> torch.Tensor:
        return self.restored[severed] - self.corrupted
