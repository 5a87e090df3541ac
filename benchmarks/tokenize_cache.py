"""Tokenize-cache benchmark: the first (miss) and second (hit) ``tokenize_cached`` call on alpaca_zh_4k.

Run from the repository root: ``.venv/bin/python benchmarks/tokenize_cache.py``. Uses
``../shared/data/alpaca_zh/alpaca_zh_4k.json`` (4 rows with an empty output are skipped) and the ChatGLM3
fixture tokenizer ``../shared/fixtures/chatglm3_tiny``, and a fresh temporary cache folder. Library
imports are done before timing, so both numbers are the cache's own work. Goal: hit >= 10x faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "alpaca_zh" / "alpaca_zh_4k.json")
    parser.add_argument("--model", type=Path, default=SHARED / "fixtures" / "chatglm3_tiny")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    for needed in (args.data, args.model):
        if not needed.exists():
            print(f"{needed}: missing (../shared holds the datasets and fixtures)", file=sys.stderr)
            return 1

    # Imported up front: the first call must not be charged for importing datasets / transformers.
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    from glmtune.data import EncodeSettings, tokenize_cached
    from glmtune.tokenization import ChatGLMTokenizer  # noqa: F401

    settings = EncodeSettings(max_length=args.max_length)
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as cache:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            ds, info = tokenize_cached(args.data, args.model, settings, cache_dir=cache, skip_invalid=True)
            times.append(time.perf_counter() - started)
            print(
                f"{'hit ' if info.hit else 'miss'}: {times[-1]:8.3f} s  rows {info.rows}  "
                f"tokens {sum(ds['length'])}  truncated {info.stats.truncated}  "
                f"skipped {len(info.stats.invalid)}"
            )
    ratio = times[0] / times[1]
    print(f"speed-up: {ratio:.1f}x (goal >= 10x): {'ok' if ratio >= 10 else 'BELOW GOAL'}")
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
