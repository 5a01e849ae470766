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
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from hw2.errors import UserError

AFHQ_URL = "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"
CHUNK = 1 << 20


def download(url, target, progress=True, timeout=30):
    """Fetch url into target, resuming a partial target.part left by an earlier call."""
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part file is already complete
            part.replace(target)
            return target
        raise UserError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot download {url} ({reason}); without network, fetch the archive elsewhere "
            f"and run `python -m hw2.afhq --archive PATH_TO_ZIP`"
        ) from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=f"downloading {target.name}", disable=not progress
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise UserError(f"the download of {url} stopped early; run the same command again to resume it")
    part.replace(target)
    return target


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
        archive = Path(args.archive) if args.archive else download(args.url, dest / "afhq.zip")
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
