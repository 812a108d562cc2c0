"""Finds the image files of a folder dataset that do not decode, before a long run:

    python -m bt_keras.data_check FOLDER [--workdir=DIR] [--threads=N] [--progress | --no-progress]

FOLDER is the PATH of `--config.dataset=folder:PATH` (the `folder:` prefix may be kept): class sub-folders of
.jpg/.jpeg/.png files, or train/ val/ validation/ test/ folders of them. Every file is decoded fully, as training
decodes it, in threads (`bt_keras.data.image_check`): not an image, truncated, and garbage in the middle of a JPEG
(libjpeg's "Corrupt JPEG data" warnings) are each named with the reason.

Prints one summary line, then one line per bad file, `PATH<TAB>REASON` (so `cut -f1` gives the paths). A training
run leaves these files out by itself and lists them in WORKDIR/bad_images.txt; with --workdir this command writes
that list and keeps its check in DIR, so a run started in DIR does not decode the folder again.

Exit status: 0 when every file decodes, 1 when any does not, 2 for an error (no such folder, no class sub-folders),
printed as one `ERROR: ...` line.
"""

from __future__ import annotations

import argparse
import sys
import time

from bt_keras.cli import console


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bt_keras.data_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="FOLDER", help="the image folder (PATH or folder:PATH)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="also write DIR/bad_images.txt and keep the check in DIR for a run started there")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="files decoded at once (default: one per CPU)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress line on stderr (default: for 2,000 files or more)")
    return parser


def _summary(name: str, folders, checks, seconds: float) -> str:
    """'folder:PATH: 10 of 119 image files do not decode (2 split folders, 0.4 s, 300 files/s)'."""
    total, bad = sum(c.files for c in checks), sum(len(c.bad) for c in checks)
    where = f"{len(folders)} split folders" if len(folders) > 1 else str(folders[0])
    verdict = f"{bad} of {total} image files do not decode" if bad else f"all {total} image files decode"
    return f"{name}: {verdict} ({where}, {seconds:.1f} s, {total / max(seconds, 1e-9):,.0f} files/s)"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"ERROR: --threads={args.threads} must be at least 1", file=sys.stderr)
        return 2
    name = args.folder if args.folder.startswith("folder:") else f"folder:{args.folder}"
    with console.quiet_start():
        from bt_keras.data import sources
    start = time.monotonic()
    try:
        found = sources.check_folder_images(name, args.workdir, threads=args.threads, progress=args.progress)
        found.record()
    except (ValueError, OSError) as error:  # DatasetNotFoundError is an OSError
        print(f"ERROR: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(_summary(name, found.roots, found.checks, time.monotonic() - start))
    bad = sorted((path, reason) for check in found.checks for path, reason in check.bad.items())
    for path, reason in bad:
        print(f"{path}\t{reason}")
    return 1 if bad else 0


def run() -> None:
    """Console entry point (`bt-keras-data-check`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
