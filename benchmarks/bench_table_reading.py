"""Peak memory of reading a Hugging Face dataset of images: a few rows at a time, or whole.

    python benchmarks/bench_table_reading.py                          # 6,000 images of 96x96 RGB noise, parquet
    python benchmarks/bench_table_reading.py --row-group 100          # the same, 100 images per row group
    python benchmarks/bench_table_reading.py --format save_to_disk    # an arrow save_to_disk folder
    python benchmarks/bench_table_reading.py --images 1000            # CI size

Writes ``--images`` PNG images of random noise (incompressible, ~27 KB each) with ``datasets``
(an ``Image`` and a ``ClassLabel`` feature) as parquet (``to_parquet``; ``--row-group`` images per
row group, 0 leaving datasets' own choice: row groups of about 100 MB) or with ``save_to_disk``,
then, each in a fresh Python process, measures the growth of peak RSS (``VmHWM``, Linux) over
the process's peak after its imports:

* ``lazy``  -- ``load_dataset(path)`` (every image checked and hashed), then every
  ``Dataset.image(i)`` decoded in order and dropped, and the dataset's fingerprint;
* ``whole`` -- the reference a naive reader is: the table read whole with pyarrow
  (``pyarrow.parquet.read_table``, or the arrow stream's ``read_all``), then the same decoding.

Prints both growths, the data's size and its largest chunk (row group or record batch), and one
JSON line.
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


def write_parquet(path: Path, images: int, side: int, row_group: int, *, saved: bool = False) -> None:
    """``images`` noise PNGs with labels 0, 1, 2 in turn, written by ``datasets`` itself.

    ``saved``: a ``save_to_disk`` folder at ``path`` instead of a parquet file.
    """
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
    table = Dataset.from_dict(rows, features=features)
    if saved:
        table.save_to_disk(str(path))
    else:
        table.to_parquet(str(path), batch_size=row_group or None)


def _peak_mb() -> float:
    """This process's peak RSS in MiB: VmHWM, which starts afresh at exec (ru_maxrss does not)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, path: str) -> dict[str, float]:
    """Run in a child process: the peak-RSS growth of reading every image of ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pytest_mllmprobe.data import load_dataset

    warm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(warm, "PNG")
    Image.open(warm).load()  # the first use of the PNG decoder and of the readers goes into the baseline
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1]}), sink)
    pq.read_table(pa.BufferReader(sink.getvalue()))
    before = _peak_mb()
    if mode == "lazy":
        data = load_dataset(path)
        for i in range(len(data)):
            data.image(i)
        data.fingerprint  # noqa: B018 - hashes every sample
        count = len(data)
    else:
        if Path(path).is_dir():
            with pa.OSFile(str(next(Path(path).glob("*.arrow")))) as handle:
                table = pa.ipc.open_stream(handle).read_all()
        else:
            table = pq.read_table(path)
        column = table.column("image")
        for i in range(len(column)):
            Image.open(io.BytesIO(column[i].as_py()["bytes"])).convert("RGB")
        count = len(column)
    return {"images": count, "peak_growth_mb": _peak_mb() - before}


def _largest_chunk(path: Path) -> tuple[int, int]:
    """How many chunks (row groups, record batches) the data has, and the largest's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        with pa.OSFile(str(next(path.glob("*.arrow")))) as handle:
            sizes = [batch.nbytes for batch in pa.ipc.open_stream(handle)]
    else:
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(k).total_byte_size for k in range(meta.num_row_groups)]
    return len(sizes), max(sizes)


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
    parser.add_argument("--row-group", type=int, default=0,
                        help="images per parquet row group (default 0: datasets' own choice)")
    parser.add_argument("--format", choices=("parquet", "save_to_disk"), default="parquet")
    parser.add_argument("--workdir", default=None, help="where the data goes (default: a temp folder)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        saved = args.format == "save_to_disk"
        path = Path(folder) / ("saved" if saved else "images.parquet")
        write_parquet(path, args.images, args.side, args.row_group, saved=saved)
        chunks, largest = _largest_chunk(path)
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
        lazy, whole = _child("lazy", path), _child("whole", path)
        summary = {
            "images": args.images, "format": args.format, "data_mb": round(size / 2**20, 2),
            "chunks": chunks, "largest_chunk_mb": round(largest / 2**20, 2),
            "lazy_peak_growth_mb": round(lazy["peak_growth_mb"], 2),
            "whole_peak_growth_mb": round(whole["peak_growth_mb"], 2),
        }
    print(f"{args.images} images of {args.side}x{args.side} noise: {summary['data_mb']} MB of {args.format} in "
          f"{chunks} chunks (largest {summary['largest_chunk_mb']} MB)")
    print(f"peak RSS growth, load_dataset + every image decoded once: {summary['lazy_peak_growth_mb']:.1f} MB")
    print(f"peak RSS growth, the table read whole + the same:          {summary['whole_peak_growth_mb']:.1f} MB")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
