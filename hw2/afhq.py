"""Download AFHQ (Choi et al. 2020, StarGAN v2) and unpack it as data/{train,val}/{cat,dog,wild}.

    python -m hw2.afhq                        # download (resumable) and unpack into ./data
    python -m hw2.afhq --archive afhq.zip     # unpack an archive you already have
    python -m hw2.afhq --url URL              # another copy of the archive (e.g. your course's)

The archive is AFHQ v1 (about 730 MB, 15k 512x512 JPEGs, licence CC BY-NC 4.0).
An interrupted download resumes from where it stopped on the next call.
"""
import argparse
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from hw2.download import download
from hw2.errors import UserError

AFHQ_URL = "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"
CHUNK = 1 << 20


def _destination(name, data_dir):
    """Where an archive member goes: the leading 'afhq/' is dropped, unsafe paths are refused."""
    parts = PurePosixPath(name).parts
    if parts and parts[0] == "afhq":
        parts = parts[1:]
    if not parts or any(p in ("..", "") for p in parts) or PurePosixPath(name).is_absolute():
        return None
    return Path(data_dir).joinpath(*parts)


def unpack(archive, data_dir, progress=True):
    """Extract the archive into data_dir so that data_dir/train/cat/*.jpg exists."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{archive} is not a readable zip archive ({e}); delete it and download again") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for member in tqdm(members, desc="unpacking", unit="file", disable=not progress):
            dest = _destination(member.filename, data_dir)
            if dest is None:
                continue
            if dest.is_file() and dest.stat().st_size == member.file_size:
                continue  # already unpacked by an earlier, interrupted call
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            with zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            tmp.replace(dest)
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise UserError(f"{archive} has no train/ folder: is it the AFHQ archive?")
    return train


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download AFHQ and unpack it as DEST/train/{cat,dog,wild}.")
    parser.add_argument("--dest", default="./data", help="folder to unpack into")
    parser.add_argument("--url", default=AFHQ_URL, help="where to download the zip archive from")
    parser.add_argument("--archive", default=None, help="use this zip file instead of downloading")
    parser.add_argument("--keep_archive", action="store_true", help="keep the downloaded zip after unpacking")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    try:
        archive = Path(args.archive) if args.archive else download(
            args.url, dest / "afhq.zip",
            offline_hint="without network, fetch the archive elsewhere and run `python -m hw2.afhq --archive PATH_TO_ZIP`",
        )
        train = unpack(archive, dest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.archive and not args.keep_archive:
        archive.unlink()
    counts = {p.name: sum(1 for _ in p.iterdir()) for p in sorted(train.iterdir()) if p.is_dir()}
    print(f"AFHQ is in {train}: " + ", ".join(f"{c} {n} images" for n, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
