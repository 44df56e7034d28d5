"""Peak memory of reading a Hugging Face parquet file of images: one chunk at a time, or whole.

    python benchmarks/bench_table_reading.py                  # 6,000 images of 96x96 RGB noise (~167 MB)
    python benchmarks/bench_table_reading.py --row-group 0    # the same with datasets' default row groups
    python benchmarks/bench_table_reading.py --images 1000    # CI size

Writes ``--images`` PNG images of random noise (incompressible, ~27 KB each) with ``datasets``
(an ``Image`` and a ``ClassLabel`` feature, ``to_parquet(batch_size=--row-group)``: 100 images
per row group by default; 0 leaves datasets' own choice, row groups of about 100 MB), then, each
in a fresh Python process, measures the growth of peak RSS (``VmHWM``, Linux) over the process's
peak after its imports:

* ``lazy``  -- ``load_dataset(file)`` (every image checked and hashed), then every
  ``Dataset.image(i)`` decoded in order and dropped, and the dataset's fingerprint;
* ``whole`` -- the reference a naive reader is: ``pyarrow.parquet.read_table`` of the file, then
  the same decoding.

Prints both growths, the file size and the largest row group's bytes, and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def write_parquet(path: Path, images: int, side: int, row_group: int) -> None:
    """``images`` noise PNGs with labels 0, 1, 2 in turn, written by ``datasets`` itself."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()

    features = Features({"image": Image(), "label": ClassLabel(names=["normal", "benign", "malignant"])})
    rows = {"image": [{"bytes": png(), "path": None} for _ in range(images)], "label": [i % 3 for i in range(images)]}
    Dataset.from_dict(rows, features=features).to_parquet(str(path), batch_size=row_group or None)


def _peak_mb() -> float:
    """This process's peak RSS in MiB: VmHWM, which starts afresh at exec (ru_maxrss does not)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, path: str) -> dict[str, float]:
    """Run in a child process: the peak-RSS growth of reading every image of ``path``."""
    import pyarrow.ipc  # noqa: F401 - both readers' imports before the baseline
    import pyarrow.parquet as pq
    from PIL import Image

    from pytest_mllmprobe.data import load_dataset

    warm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(warm, "PNG")
    Image.open(warm).load()  # the PNG decoder's first use, not the file, goes into the baseline
    pq.ParquetFile(path).metadata  # noqa: B018 - and so does opening a parquet file
    before = _peak_mb()
    if mode == "lazy":
        data = load_dataset(path)
        for i in range(len(data)):
            data.image(i)
        data.fingerprint  # noqa: B018 - hashes every sample
        count = len(data)
    else:
        table = pq.read_table(path)
        column = table.column("image")
        for i in range(len(column)):
            Image.open(io.BytesIO(column[i].as_py()["bytes"])).convert("RGB")
        count = len(column)
    return {"images": count, "peak_growth_mb": _peak_mb() - before}


def _child(mode: str, path: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} reading failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--side", type=int, default=96, help="image width and height in pixels")
    parser.add_argument("--row-group", type=int, default=100, help="images per parquet row group (0: datasets' default)")
    parser.add_argument("--workdir", default=None, help="where the parquet file goes (default: a temp folder)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return {}
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        path = Path(folder) / "images.parquet"
        write_parquet(path, args.images, args.side, args.row_group)
        meta = pq.ParquetFile(path).metadata
        largest = max(meta.row_group(k).total_byte_size for k in range(meta.num_row_groups))
        lazy, whole = _child("lazy", path), _child("whole", path)
        summary = {
            "images": args.images, "file_mb": round(path.stat().st_size / 2**20, 2),
            "row_groups": meta.num_row_groups, "largest_row_group_mb": round(largest / 2**20, 2),
            "lazy_peak_growth_mb": round(lazy["peak_growth_mb"], 2),
            "whole_peak_growth_mb": round(whole["peak_growth_mb"], 2),
        }
    print(f"{args.images} images of {args.side}x{args.side} noise: {summary['file_mb']} MB of parquet in "
          f"{summary['row_groups']} row groups (largest {summary['largest_row_group_mb']} MB)")
    print(f"peak RSS growth, load_dataset + every image decoded once: {summary['lazy_peak_growth_mb']:.1f} MB")
    print(f"peak RSS growth, pyarrow.parquet.read_table + the same:   {summary['whole_peak_growth_mb']:.1f} MB")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
