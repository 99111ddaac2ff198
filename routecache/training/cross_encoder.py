"""Fine-tune the packaged all-MiniLM-L6-v2 weights into a cross-encoder for duplicate questions.

A bi-encoder compares two vectors made apart; a cross-encoder reads both questions at once and
sees that "in Paris" and "in London" differ, which is where cosine similarity fails. The model is
the MiniLM transformer with one linear head over the mean-pooled tokens (the pooling its weights
were trained for, so fine-tuning starts close), trained with binary cross-entropy, pair order
randomised each epoch, and batches of similar length so little time goes into padding.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routecache.cache.embedder import mean_pool
from routecache.training.data_files import DataFileError
from routecache.training.pair_data import LabelledPair

log = logging.getLogger(__name__)

MAX_PAIR_TOKENS = 128  # 99.9% of qqp pairs fit; longer ones keep their first 128 word pieces


@dataclass(frozen=True)
class TrainingPlan:
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 4e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 13
    threads: int = 2
    init_weights: Path | None = None  # continue from earlier weights instead of the packaged ones
    device: str = "auto"  # "cpu", "cuda" or "auto": a GPU when torch sees one


def training_device(requested: str) -> str:
    """The torch device to train on; asking for "cuda" without one is an error, not a slow run."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA device")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {requested!r}")
    return requested


def build_module(model_dir: Path, outputs: int = 1) -> Any:
    """The torch module: MiniLM + linear head on the mean-pooled tokens.

    One output (the cross-encoder) gives one logit per input, else a row of `outputs` logits.
    """
    import torch
    from transformers import AutoModel

    class CrossEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, outputs)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            logits = self.head(mean_pool(hidden, attention_mask))
            return logits.squeeze(-1) if outputs == 1 else logits

    return CrossEncoder()


def load_weights(path: Path) -> dict[str, Any]:
    """A state dict saved by `train_cross_encoder`, read before the model is built: a wrong
    --weights or --init-weights file is one line and exit 2, not a traceback after the load."""
    import torch

    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except Exception as exc:  # torch's unpickler raises KeyError, EOFError... on other bytes
        raise DataFileError(f"{path}: not weights saved by train-verifier") from exc
    return state


def restore_weights(module: Any, state: dict[str, Any], path: Path) -> None:
    """Load `state` into `module`; weights of another model are one line, not a traceback."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
        # torch's message opens with a header line; the next names the first mismatch.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1:] or lines or [type(exc).__name__])[0][:160]
        raise DataFileError(f"{path}: not weights of this cross-encoder ({detail})") from exc


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length in random order: shuffle, sort within windows, cut, shuffle."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def learning_rate_factor(step: int, total_steps: int, warmup: int) -> float:
    """The share of the learning rate at `step`: up over `warmup` steps, then down to 0."""
    # A run that is all warm-up (one epoch of pairs that fit one batch) has no decay steps:
    # dividing by their count raised ZeroDivisionError before the first step.
    decay = max(1, total_steps - warmup)
    return min((step + 1) / warmup, max(0.0, (total_steps - step) / decay))


def train_cross_encoder(
    pairs: Sequence[LabelledPair], model_dir: Path, out_dir: Path, plan: TrainingPlan
) -> Path:
    """Train on `pairs`; writes the state dict to out_dir/cross_encoder.pt and returns its path."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(plan.seed)
    torch.set_num_threads(plan.threads)
    rng = random.Random(plan.seed)
    device = training_device(plan.device)
    log.info("training on %s", device)
    start = plan.init_weights
    init = None if start is None else (start, load_weights(start))  # read before the model
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    module = build_module(model_dir)
    if init is not None:
        restore_weights(module, init[1], init[0])
    module.to(device).train()
    optimiser = torch.optim.AdamW(
        module.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay
    )
    lengths = [len(p.query) + len(p.cached) for p in pairs]
    steps_per_epoch = math.ceil(len(pairs) / plan.batch_size)
    total_steps = steps_per_epoch * plan.epochs
    warmup = max(1, int(total_steps * plan.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: learning_rate_factor(step, total_steps, warmup)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started, step = time.perf_counter(), 0
    for epoch in range(plan.epochs):
        running = 0.0
        for batch in length_batches(lengths, plan.batch_size, rng):
            chosen = [pairs[i] for i in batch]
            flipped = [rng.random() < 0.5 for _ in chosen]
            first = [p.cached if f else p.query for p, f in zip(chosen, flipped, strict=True)]
            second = [p.query if f else p.cached for p, f in zip(chosen, flipped, strict=True)]
            encoded = tokenizer(
                first,
                second,
                padding=True,
                truncation=True,
                max_length=MAX_PAIR_TOKENS,
                return_tensors="pt",
            )
            labels = torch.tensor([float(p.duplicate) for p in chosen], device=device)
            loss = loss_fn(module(**encoded.to(device)), labels)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            running += float(loss.detach())
            if step % 100 == 0:
                log.info(
                    "epoch %d step %d/%d loss %.4f elapsed %.0f s",
                    epoch,
                    step,
                    total_steps,
                    running / 100,
                    time.perf_counter() - started,
                )
                running = 0.0
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(_cpu_state(module), out_dir / f"cross_encoder_epoch{epoch + 1}.pt")
    final = out_dir / "cross_encoder.pt"
    torch.save(_cpu_state(module), final)
    return final


def _cpu_state(module: Any) -> dict[str, Any]:
    """Weights on the CPU, so what a GPU run saves loads anywhere (export, scoring)."""
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
