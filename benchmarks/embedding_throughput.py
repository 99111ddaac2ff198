"""How fast can this machine embed? Single-query latency and batch throughput of the packaged
all-MiniLM-L6-v2 in torch and ONNX Runtime, outside the server.

    python -m benchmarks.embedding_throughput [--texts N] [--json]

The texts are the prompts of the packaged GSM8K recordings (the same the demo sends), or the
load run's own semantic queries when benchmarks.grpc_load measures its baseline, so the figures
compare directly with the load run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from routecache.cache.embedder import MiniLMEmbedder
from routecache.cache.onnx_embedder import OnnxMiniLMEmbedder
from routecache.cache.ports import Embedder
from routecache.replay.recordings import Recordings


def sample_texts(count: int) -> list[str]:
    prompts = list(Recordings.load().prompts())
    return (prompts * (count // len(prompts) + 1))[:count]


def latency_ms(encode: Callable[[Sequence[str]], Any], texts: Sequence[str]) -> dict[str, float]:
    samples = []
    for text in texts:
        start = time.perf_counter()
        encode([text])
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
    }


def throughput(embedder: Embedder, texts: Sequence[str], batch: int) -> float:
    """Texts per second, batches cut from length-sorted texts (as the embedding worker does)."""
    ordered = sorted(texts, key=len)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch):
        embedder.encode(ordered[i : i + batch])
    return len(ordered) / (time.perf_counter() - start)


def measure(count: int, stream: Sequence[str] = ()) -> dict[str, Any]:
    """Both encoders on `count` texts: the stream's texts (repeated) or the GSM8K prompts."""
    texts = list(stream) * (count // max(1, len(stream)) + 1) if stream else sample_texts(count)
    texts = texts[:count]
    short = ["What is the capital of France?"] * 200
    results: dict[str, Any] = {"texts": len(texts)}
    for name, embedder in (("torch", MiniLMEmbedder()), ("onnx", OnnxMiniLMEmbedder())):
        embedder.encode(texts[:8])  # warm-up
        results[name] = {
            "short_query": latency_ms(embedder.encode, short),
            "prompt_query": latency_ms(embedder.encode, texts[:200]),
            "throughput_per_s": {
                str(batch): round(throughput(embedder, texts, batch), 1)
                for batch in (1, 8, 16, 32, 64)
            },
        }
    best = max(
        (rate, f"{name} batch {batch}")
        for name in ("torch", "onnx")
        for batch, rate in results[name]["throughput_per_s"].items()
    )
    results["best_throughput_per_s"], results["best_setting"] = best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024, help="texts per throughput run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = measure(args.texts)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name in ("torch", "onnx"):
        r = results[name]
        print(
            f"{name:5}  one short query p50 {r['short_query']['p50_ms']:.2f} ms "
            f"p99 {r['short_query']['p99_ms']:.2f} ms; one GSM8K prompt p50 "
            f"{r['prompt_query']['p50_ms']:.2f} ms"
        )
        rates = "  ".join(f"b{b}: {v:.0f}/s" for b, v in r["throughput_per_s"].items())
        print(f"       throughput {rates}")
    print(f"best: {results['best_throughput_per_s']:.0f} texts/s ({results['best_setting']})")


if __name__ == "__main__":
    main()
