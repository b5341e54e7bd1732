"""How fast does `validate_dataset` check a realistic folder? (A benchmark, not a test.)

Writes N JPEGs of random sizes between 512 and 1024 px with random photo-like content (smooth
colour fields plus grain, so file sizes resemble real photos) and a caption each into a temporary
folder, then times validate_dataset on them; generation is not timed. The files were just written,
so they are read from the page cache (the CPU cost) unless --cold drops the cache first (Linux, root),
which measures what a user sees on a dataset not read since boot.

    python benchmarks/validate_dataset.py [--count 1000] [--workers 1 2 4] [--cold] [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from flux2_lora_core.data import validation  # noqa: E402


def write_pair(folder: Path, index: int, seed: int) -> int:
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(512, 1025, size=2))
    base = rng.integers(0, 256, size=(height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    path = folder / f"img_{index:05d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    vocabulary = ["a", "photo", "of", "red", "blue", "dog", "at", "the", "beach", "sunset"]
    words = rng.choice(vocabulary, size=rng.integers(5, 40))
    (folder / f"img_{index:05d}.txt").write_text(" ".join(words))
    return path.stat().st_size


def drop_page_cache(wanted: bool) -> None:
    if not wanted:
        return
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        sys.exit(f"--cold needs root on Linux to drop the page cache: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="how many images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[validation.WORKERS],
                        help=f"thread counts to time, e.g. 1 2 4 (default {validation.WORKERS}, the module's)")
    parser.add_argument("--keep-dir", metavar="DIR",
                        help="write the images here and keep them (default: a temporary folder, deleted after)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each timed run (needs root on Linux)")
    args = parser.parse_args()

    folder = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="flux2-validate-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor() as pool:
            sizes = list(pool.map(lambda i: write_pair(folder, i, args.seed), range(args.count)))
        print(f"generated {args.count} JPEGs + captions ({sum(sizes) / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - start:.1f} s into {folder}")
        drop_page_cache(args.cold)
        start = time.perf_counter()
        validation.validate_dataset(folder)
        seconds = time.perf_counter() - start
        print(f"first run{' (cold cache)' if args.cold else ''} (workers={validation.WORKERS}): {seconds:.2f} s ({args.count / seconds:.0f} images/s)")
        for workers in args.workers:
            validation.WORKERS = workers
            drop_page_cache(args.cold)
            start = time.perf_counter()
            report = validation.validate_dataset(folder)
            seconds = time.perf_counter() - start
            assert report.usable and report.stats["images"]["usable"] == args.count, report.format_text()
            print(f"workers={workers}{' cold' if args.cold else ''}: validated {args.count} images in {seconds:.2f} s "
                  f"({args.count / seconds:.0f} images/s)")
    finally:
        if not args.keep_dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
