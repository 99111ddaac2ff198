"""Experiment (issue 6): a learned pooling head over the cache's frozen MiniLM token states.

    python -m benchmarks.router_token_head --train routing_train.jsonl --dev routing_dev.jsonl \
        --out DIR [--embedding-cache FILE.npz]

The service's encoder pass already computes every token's state before mean pooling them into
the cache's vector, so a head on those states would cost the router no second pass: unlike the
fine-tuned embedder (benchmarks.router_finetune), it could be shipped within the 1 ms scoring
budget. The head is attention pooling (4 learned scoring vectors) beside the mean, dropout 0.3,
and one linear layer with two logistic outputs (cheap fails, strong fails), trained for 3
epochs (AdamW 1e-3) on routing_train less the service's holdout slice. Its holdout and dev
logits go to DIR/scores.npz and are compared with the shipped kind of model, and blended with
it, by router_finetune's own comparison. Encoding the 12k prompts takes about 16 minutes on the
2-core machine (kept in DIR/token_states.pt); training, a minute.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.router_finetune import MAX_PROMPT_TOKENS, compare
from routecache.cache.embedder import MINILM_DIMENSION, packaged_minilm_path
from routecache.training.routing_data import RoutingRow, holdout_mask, read_routing_rows

log = logging.getLogger(__name__)
HEADS, DROPOUT, EPOCHS, BATCH_SIZE = 4, 0.3, 3, 64


def token_states(texts: Sequence[str]) -> list[Any]:
    """Each text's last-layer token states (fp16, padding dropped), as the encoder leaves them."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = str(packaged_minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    states: list[Any] = [None] * len(texts)
    with torch.no_grad():
        for start in range(0, len(order), 32):
            chosen = order[start : start + 32]
            encoded = tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                max_length=MAX_PROMPT_TOKENS, return_tensors="pt")  # fmt: skip
            hidden = model(**encoded).last_hidden_state
            for row, i in enumerate(chosen):
                length = int(encoded["attention_mask"][row].sum())
                states[i] = hidden[row, :length].to(torch.float16).clone()
    return states


def padded(batch: Sequence[Any]) -> tuple[Any, Any]:
    import torch

    longest = max(len(s) for s in batch)
    states = torch.zeros(len(batch), longest, MINILM_DIMENSION)
    mask = torch.zeros(len(batch), longest)
    for row, s in enumerate(batch):
        states[row, : len(s)], mask[row, : len(s)] = s.float(), 1
    return states, mask


def pooling_head() -> Any:
    import torch

    class PoolingHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = torch.nn.Linear(MINILM_DIMENSION, HEADS)
            self.drop = torch.nn.Dropout(DROPOUT)
            self.out = torch.nn.Linear(MINILM_DIMENSION * (HEADS + 1), 2)

        def forward(self, states: Any, mask: Any) -> Any:
            mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            weights = self.score(states).masked_fill(mask[..., None] == 0, -1e4).softmax(1)
            attended = torch.einsum("bth,btd->bhd", weights, states).flatten(1)
            return self.out(self.drop(torch.cat([mean, attended], 1)))

    return PoolingHead()


def train_head(states: Sequence[Any], rows: Sequence[RoutingRow]) -> Any:
    import torch

    torch.manual_seed(0)
    head = pooling_head()
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    labels = torch.tensor([[float(not r.weak_correct), float(not r.strong_correct)] for r in rows])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    for _ in range(EPOCHS):
        for batch in np.array_split(rng.permutation(len(states)), len(states) // BATCH_SIZE):
            loss = loss_fn(head(*padded([states[i] for i in batch])), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return head.eval()


def head_logits(head: Any, states: Sequence[Any]) -> npt.NDArray[np.float32]:
    import torch

    with torch.no_grad():
        parts = [head(*padded(states[i : i + 256])) for i in range(0, len(states), 256)]
    return torch.cat(parts).numpy()


def load_or_encode(path: Path, texts: Sequence[str]) -> list[Any]:
    import torch

    if path.is_file():
        return list(torch.load(path))
    started = time.perf_counter()
    states = token_states(texts)
    torch.save(states, path)
    log.info("encoded %d prompts in %.0f s", len(texts), time.perf_counter() - started)
    return states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--dev", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for states and logits")
    parser.add_argument("--embedding-cache", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(2)
    rows, dev = read_routing_rows([args.train]), read_routing_rows([args.dev])
    args.out.mkdir(parents=True, exist_ok=True)
    states = load_or_encode(args.out / "token_states.pt", [r.prompt for r in [*rows, *dev]])
    held = holdout_mask([r.prompt for r in rows], 0.2, 0)
    train = [i for i, h in enumerate(held) if not h]
    hold = [i for i, h in enumerate(held) if h]
    head = train_head([states[i] for i in train], [rows[i] for i in train])
    scores = args.out / "scores.npz"
    np.savez(scores, hold=head_logits(head, [states[i] for i in hold]),
             dev=head_logits(head, states[len(rows) :]))  # fmt: skip
    train_rows, hold_rows = [rows[i] for i in train], [rows[i] for i in hold]
    compare(scores, train_rows, hold_rows, dev, args.embedding_cache, name="token head")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
