"""What the runner's parse-time dataset checks cost, against decoding the splits once.

    python -m benchmarks.dataset_checks [--dataset cifar10] [--data_dir ../shared/tfds]

Times, in one process, over a prepared TFDS dataset: the file checks of both
splits (info files, presence, sizes against dataset_info.json), the CRC
verification of every record of both splits (what a run of an in-memory dataset
adds before anything is written), and decoding both splits into memory (what
such a run does anyway at start, ``grasp_jax/data/in_memory.py``). Prints the
seconds and the verification's share of the decode. The first verification of a
file is timed (later ones in the same process are remembered per file).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data_dir", default="../shared/tfds")
    args = parser.parse_args()

    from grasp_jax.data import get_info, in_memory, integrity
    from grasp_jax.data.layout import Shard

    info = get_info(args.dataset)
    splits = (info.train_split, info.test_split)
    t = time.perf_counter()
    for split in splits:
        integrity.check_split_files(info, split, args.data_dir)
    files_s = time.perf_counter() - t
    t = time.perf_counter()
    for split in splits:
        integrity.verify_records(info, split, args.data_dir)
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    for split in splits:
        in_memory._decoded(info, split, args.data_dir, Shard(0, 1, split == info.train_split))
    decode_s = time.perf_counter() - t
    print(f"{args.dataset} ({', '.join(splits)}), {args.data_dir}")
    print(f"  file checks (sizes)      {files_s:7.3f} s")
    print(f"  record CRC verification  {verify_s:7.3f} s")
    print(f"  decoding into memory     {decode_s:7.3f} s")
    print(f"  verification / decoding  {verify_s / decode_s:7.3f}")


if __name__ == "__main__":
    main()
