"""Experiment (issue 6): a projection learned from the labels for the router's neighbour bank.

    python -m benchmarks.router_projection --train routing_train.jsonl --dev routing_dev.jsonl \
        --embedding-cache FILE.npz [--variants pca128,pls32,...] [--no-dev] [--json]

The shipped bank (classifier/neighbours.py) projects the MiniLM embedding with PCA-128, an
unsupervised projection: neighbours are topically similar, not similar in difficulty. Each
variant here replaces PCA by another linear projection (a mean and a components matrix, so
scoring costs the same) and keeps everything else of the shipped model: the neighbour rates for
k = 10/25/50/100, the 7 text features, the two StandardScaler + LogisticRegression heads.

A projection fitted on the training labels makes the leave-one-out neighbour features of the
training rows optimistic (the projection has seen the row's label). Variants marked `/xfit`
compute the heads' training features by cross-fitting: for each of 5 inner folds, a projection
fitted on the other folds projects everything, and the fold's rows get their leave-one-out
features from it. The bank of the returned model uses the projection fitted on all rows.

Measures, as in docs/classifier.md: 5-fold CV over the train file (`KFold(5, shuffle=True,
random_state=0)`; projection, bank and heads fitted on the other 4 folds only; out-of-fold
scores over all rows), then routing_dev for the variants given with --dev-variants: fitted on
train less the service's holdout slice (as the packaged model) and on all of train.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold

from routecache.classifier import metrics
from routecache.classifier.features import text_feature_matrix
from routecache.classifier.model import DifficultyModel, SklearnDifficultyClassifier
from routecache.classifier.neighbours import NeighbourBank, label_matrix
from routecache.training.routing_data import (
    RoutingRow,
    holdout_mask,
    outcomes,
    read_routing_rows,
)
from routecache.training.train_classifier import (
    DEFAULT_C,
    _head,
    embed_prompts,
    make_embedder,
)

Floats = npt.NDArray[np.float64]
Float32s = npt.NDArray[np.float32]
# (embeddings, targets: cheap_fails, strong_fails, gain, is_gsm8k) -> (mean, components)
Projector = Callable[[Float32s, Floats], tuple[Float32s, Float32s]]
INNER_FOLDS = 5


@dataclass(frozen=True)
class Data:
    rows: list[RoutingRow]
    embeddings: Float32s
    text: Floats  # text_feature_matrix, computed once
    labels: Floats  # label_matrix: cheap_fails, strong_fails, gain
    gsm: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, rows: list[RoutingRow], embeddings: Float32s) -> Data:
        weak, strong = outcomes(rows)
        return cls(
            rows,
            embeddings,
            text_feature_matrix([r.prompt for r in rows]),
            label_matrix(~weak, ~strong),
            np.array([r.source == "gsm8k" for r in rows]),
        )

    def take(self, index: npt.NDArray[np.int64]) -> Data:
        return Data(
            [self.rows[i] for i in index],
            self.embeddings[index],
            self.text[index],
            self.labels[index],
            self.gsm[index],
        )

    @property
    def targets(self) -> Floats:
        return np.column_stack([self.labels, self.gsm.astype(np.float64)])


# --- projections -------------------------------------------------------------------------


def pca(dimension: int) -> Projector:
    def fit(x: Float32s, _: Floats) -> tuple[Float32s, Float32s]:
        model = PCA(dimension, random_state=0).fit(x)
        return model.mean_.astype(np.float32), model.components_.astype(np.float32)

    return fit


def pls_rotations(x: Floats, y: Floats, dimension: int) -> Floats:
    """PLS2 x-rotations (dimension x features) of centred x on centred y.

    NIPALS with regression-mode deflation, as sklearn's PLSRegression, but each weight vector
    is the exact first singular vector of X_k' Y_k (features x targets, tiny) instead of a
    power iteration: sklearn's iterations took seconds a fit on the busy 2-core host.
    """
    xk, yk = x.copy(), y.copy()
    weights, loadings = [], []
    for _ in range(dimension):
        u, _, _ = np.linalg.svd(xk.T @ yk, full_matrices=False)
        w = u[:, 0]
        t = xk @ w
        tt = max(float(t @ t), 1e-12)
        p = xk.T @ t / tt
        xk -= np.outer(t, p)
        yk -= np.outer(t, yk.T @ t / tt)
        weights.append(w)
        loadings.append(p)
    w_matrix, p_matrix = np.array(weights).T, np.array(loadings).T
    rotations: Floats = (w_matrix @ np.linalg.pinv(p_matrix.T @ w_matrix)).T
    return rotations


def pls(dimension: int, columns: Sequence[int] = (0, 1, 2)) -> Projector:
    """PLS of the embedding on standardised targets (columns of Data.targets)."""

    def fit(x: Float32s, targets: Floats) -> tuple[Float32s, Float32s]:
        y = targets[:, list(columns)]
        y = (y - y.mean(0)) / np.maximum(y.std(0), 1e-9)
        mean = x.mean(0)
        rotations = pls_rotations(x.astype(np.float64) - mean, y, dimension)
        return mean.astype(np.float32), rotations.astype(np.float32)

    return fit


def _unit_block(x: Float32s, mean: Float32s, components: Float32s) -> Float32s:
    """Components scaled so the block's projections have mean squared norm 1."""
    z = (x - mean) @ components.T
    scale = float(np.sqrt(np.mean(np.sum(z * z, axis=1))))
    scaled: Float32s = components / max(scale, 1e-12)
    return scaled


def concat(first: Projector, second: Projector, weight: float) -> Projector:
    """[first; weight * second], each block scaled to unit mean squared norm."""

    def fit(x: Float32s, targets: Floats) -> tuple[Float32s, Float32s]:
        mean = x.mean(0).astype(np.float32)
        a = _unit_block(x, mean, first(x, targets)[1])
        b = _unit_block(x, mean, second(x, targets)[1])
        return mean, np.vstack([a, weight * b]).astype(np.float32)

    return fit


def nca(dimension: int, epochs: int, temperature: float = 0.05, decay: float = 1.0) -> Projector:
    """A linear map (from PCA) trained so soft-neighbour label rates predict each row's labels.

    For each row, a softmax over its cosine similarities to every other row (temperature)
    weights the others' (cheap fails, strong fails); the loss is the binary cross-entropy of
    those soft rates against the row's own labels, plus `decay` * ||W - W_pca||^2.
    """

    def fit(x: Float32s, targets: Floats) -> tuple[Float32s, Float32s]:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(2)
        mean, start = pca(dimension)(x, targets)
        xs = torch.from_numpy(x - mean)
        y = torch.from_numpy(targets[:, :2].astype(np.float32))
        w0 = torch.from_numpy(start.copy())
        w = torch.nn.Parameter(w0.clone())
        optimiser = torch.optim.Adam([w], lr=1e-3)
        n = len(x)
        for _ in range(epochs):
            for batch in torch.randperm(n).split(1024):  # type: ignore[no-untyped-call]
                z = torch.nn.functional.normalize(xs @ w.T, dim=1)
                sim = z[batch] @ z.T / temperature
                sim[torch.arange(len(batch)), batch] = -torch.inf
                rates = torch.softmax(sim, dim=1) @ y
                rates = rates.clamp(1e-4, 1 - 1e-4)
                loss = torch.nn.functional.binary_cross_entropy(rates, y[batch])
                loss = loss + decay * ((w - w0) ** 2).sum()
                optimiser.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
        return mean, w.detach().numpy().astype(np.float32)

    return fit


# --- the model around a projection ---------------------------------------------------------


def make_bank(
    mean: Float32s, components: Float32s, embeddings: Float32s, labels: Floats
) -> NeighbourBank:
    probe = NeighbourBank(
        mean, components, np.zeros((1, components.shape[0]), np.float32), np.zeros((1, 3))
    )
    return NeighbourBank(mean, components, probe.project(embeddings), labels)


@dataclass(frozen=True)
class Variant:
    name: str
    projector: Projector
    cross_fit: bool = False
    c: float = DEFAULT_C


def fit_variant(variant: Variant, data: Data) -> DifficultyModel:
    mean, components = variant.projector(data.embeddings, data.targets)
    bank = make_bank(mean, components, data.embeddings, data.labels)
    if variant.cross_fit:
        neighbour = np.zeros((len(data.rows), 14))
        inner = KFold(INNER_FOLDS, shuffle=True, random_state=1)
        for other, fold in inner.split(data.embeddings):
            m, comp = variant.projector(data.embeddings[other], data.targets[other])
            fold_bank = make_bank(m, comp, data.embeddings, data.labels)
            neighbour[fold] = fold_bank.batch_features(data.embeddings, leave_one_out=True)[fold]
    else:
        neighbour = bank.batch_features(data.embeddings, leave_one_out=True)
    features = np.hstack([neighbour, data.text])
    heads = {
        "cheap_fails": _head(features, data.labels[:, 0], variant.c),
        "strong_fails": _head(features, data.labels[:, 1], variant.c),
    }
    return DifficultyModel(bank, heads)


def score(model: DifficultyModel, data: Data) -> Floats:
    features = np.hstack([model.bank.batch_features(data.embeddings), data.text])
    cheap = model.heads["cheap_fails"].predict_proba(features)[:, 1]
    strong = model.heads["strong_fails"].predict_proba(features)[:, 1]
    result: Floats = cheap - strong
    return result


def summary(scores: Floats, data: Data) -> dict[str, float]:
    weak, strong = outcomes(data.rows)
    gsm = data.gsm
    return {
        "apgr": round(metrics.apgr(scores, weak, strong), 4),
        "cpt80": round(metrics.cpt(scores, weak, strong, 0.8), 4),
        "gsm8k_apgr": round(metrics.apgr(scores[gsm], weak[gsm], strong[gsm]), 4),
        "mmlu_apgr": round(metrics.apgr(scores[~gsm], weak[~gsm], strong[~gsm]), 4),
    }


def cross_validate(variant: Variant, data: Data) -> dict[str, float]:
    started = time.perf_counter()
    oof = np.zeros(len(data.rows))
    folds = KFold(5, shuffle=True, random_state=0)
    for fit_index, test_index in folds.split(data.embeddings):
        oof[test_index] = score(fit_variant(variant, data.take(fit_index)), data.take(test_index))
    return {**summary(oof, data), "seconds": round(time.perf_counter() - started, 1)}


def scoring_p50_ms(model: DifficultyModel, data: Data, n: int = 400) -> float:
    """Per-request cost through the service's own path (assess), p50 over n dev rows."""
    classifier = SklearnDifficultyClassifier(model, version="experiment", default_threshold=0.0)
    times = []
    for row, embedding in zip(data.rows[:n], data.embeddings[:n], strict=True):
        started = time.perf_counter()
        classifier.assess(embedding, row.prompt)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 3)


def evaluate_dev(variant: Variant, train: Data, dev: Data) -> dict[str, object]:
    held = holdout_mask([r.prompt for r in train.rows], 0.2, 0)
    result: dict[str, object] = {}
    for name, part in (
        ("train_less_holdout", train.take(np.flatnonzero(~held))),
        ("all_train", train),
    ):
        started = time.perf_counter()
        model = fit_variant(variant, part)
        fit_seconds = time.perf_counter() - started
        result[name] = {
            **summary(score(model, dev), dev),
            "fit_seconds": round(fit_seconds, 1),
            "scoring_p50_ms": scoring_p50_ms(model, dev),
        }
    return result


def variants() -> dict[str, Variant]:
    table = [
        Variant("pca128", pca(128)),
        Variant("pls32", pls(32)),
        Variant("pls16/xfit", pls(16), cross_fit=True),
        Variant("pls32/xfit", pls(32), cross_fit=True),
        Variant("pls64/xfit", pls(64), cross_fit=True),
        Variant("pls32+src/xfit", pls(32, (0, 1, 2, 3)), cross_fit=True),
    ]
    for dims, weight in ((96, 0.5), (96, 1.0), (112, 0.5), (112, 0.25), (120, 0.5)):
        rest = 128 - dims
        table.append(
            Variant(
                f"pca{dims}+pls{rest}x{weight}/xfit", concat(pca(dims), pls(rest), weight), True
            )
        )
    table.append(Variant("nca64-e3/xfit", nca(64, 3, decay=0.0), cross_fit=True))
    table.append(Variant("nca128-e3-d1/xfit", nca(128, 3, decay=1.0), cross_fit=True))
    return {v.name: v for v in table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--dev", required=True, type=Path)
    parser.add_argument("--embedding-cache", type=Path, default=None)
    parser.add_argument("--variants", default="pca128", help="comma-separated; 'all' for all")
    parser.add_argument(
        "--dev-variants", default="", help="comma-separated variants to evaluate on dev (once)"
    )
    args = parser.parse_args()
    table = variants()
    chosen = list(table) if args.variants == "all" else args.variants.split(",")
    chosen = [c for c in chosen if c]
    dev_chosen = [c for c in args.dev_variants.split(",") if c]
    for name in [*chosen, *dev_chosen]:
        if name not in table:
            parser.error(f"unknown variant {name!r}; known: {', '.join(table)}")
    train_rows = read_routing_rows([args.train])
    dev_rows = read_routing_rows([args.dev])
    embedder = make_embedder("minilm")
    train = Data.of(
        train_rows, embed_prompts(embedder, [r.prompt for r in train_rows], args.embedding_cache)
    )
    dev = Data.of(
        dev_rows, embed_prompts(embedder, [r.prompt for r in dev_rows], args.embedding_cache)
    )
    for name in chosen:
        print(json.dumps({"variant": name, "cv": cross_validate(table[name], train)}), flush=True)
    for name in dev_chosen:
        print(json.dumps({"variant": name, "dev": evaluate_dev(table[name], train, dev)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
