"""A resumable HTTP download with a progress bar, used for AFHQ and the Inception weights."""
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from hw2.errors import UserError

CHUNK = 1 << 20


def download(url, target, progress=True, timeout=30, offline_hint=""):
    """Fetch url into target, resuming a partial target.part left by an earlier call.
    The file appears at target only once it is complete."""
    target = Path(target)
    if target.is_file():
        return target
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
            f"cannot download {url} ({reason}){'; ' + offline_hint if offline_hint else ''}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to write: a refusal creates nothing
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
