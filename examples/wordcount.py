"""Count the words in a set of files with bigmp.Pool, one file per task.

    python examples/wordcount.py [FILE ...] [--processes 4] [--top 10]

Without files it writes a few sample files to a temporary directory and counts those.
Each machine counts one file at a time and sends back a Counter; the driver merges them.
``bigmp.Pool`` is used exactly like ``multiprocessing.Pool``; bigmp's own flags
(``--bigmp-system``, ``--bigmp-local-mode`` and friends) are listed by ``--help``.
"""

import argparse
import collections
import os
import re
import tempfile

import bigmp

WORD = re.compile(r"[a-z']+")

SAMPLES = {
    "fox.txt": "The quick brown fox jumps over the lazy dog.\nThe dog sleeps.\n",
    "sea.txt": "The sea, the sea: the sea is wide and the ships are small.\n" * 3,
    "bigmp.txt": "bigmp spreads one Python program over many machines; "
                 "the machines run tasks and the driver merges the results.\n",
}


def count_words(path):
    """Word -> count for one file (runs on a machine)."""
    counts = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            counts.update(WORD.findall(line.lower()))
    return path, counts


def write_samples(directory):
    paths = []
    for name, text in SAMPLES.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="files to count (default: generated samples)")
    parser.add_argument("--processes", type=int, default=3, help="machines (default: %(default)s)")
    parser.add_argument("--top", type=int, default=10, help="words to print (default: %(default)s)")
    bigmp.add_arguments(parser)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="wordcount-") as tmp:
        files = args.files or write_samples(tmp)
        total = collections.Counter()
        with bigmp.Pool(args.processes, **bigmp.options_from_args(args)) as pool:
            # Files finish in any order; progress=True draws a bar when stderr is a terminal.
            for path, counts in pool.imap_unordered(count_words, files, progress=True):
                print(f"{os.path.basename(path)}: {sum(counts.values())} words")
                total.update(counts)

    print(f"total: {sum(total.values())} words, {len(total)} distinct, in {len(files)} files")
    for word, n in total.most_common(args.top):
        print(f"{n:8d} {word}")


if __name__ == "__main__":
    main()
