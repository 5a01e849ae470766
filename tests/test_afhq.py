"""Getting AFHQ: a resumable download (from a local server) and the unpacking of an archive."""
import http.server
import threading
import zipfile

import pytest

from hw2 import afhq
from hw2.download import download
from hw2.errors import UserError


def build_archive(path):
    with zipfile.ZipFile(path, "w") as zf:
        for split, cls, n in (("train", "cat", 3), ("train", "dog", 2), ("train", "wild", 1), ("val", "cat", 1)):
            for i in range(n):
                zf.writestr(f"afhq/{split}/{cls}/flickr_{cls}_{i:06d}.jpg", f"{split}{cls}{i}".encode() * 50)
        zf.writestr("afhq/../escape.txt", b"must not be written")
    return path


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload, honours 'Range: bytes=N-', and can cut a response short."""
    payload = b""
    cut_after = None  # bytes sent before the connection is dropped, for the first response only
    ranges = []

    def do_GET(self):
        start = 0
        header = self.headers.get("Range")
        if header:
            start = int(header.split("=")[1].rstrip("-"))
        type(self).ranges.append(start)
        body = self.payload[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            body, type(self).cut_after = body[: type(self).cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    payload = build_archive(tmp_path / "served.zip").read_bytes()
    handler = type("Handler", (RangeHandler,), {"payload": payload, "ranges": [], "cut_after": None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/afhq.zip", handler
    httpd.shutdown()


def test_unpack_gives_the_training_layout(tmp_path):
    archive = build_archive(tmp_path / "afhq.zip")
    train = afhq.unpack(archive, tmp_path / "data", progress=False)
    assert train == tmp_path / "data" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["cat", "dog", "wild"]
    assert len(list((train / "cat").iterdir())) == 3
    assert (tmp_path / "data" / "val" / "cat").is_dir()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "data" / "escape.txt").exists()


def test_a_broken_archive_is_named(tmp_path):
    (tmp_path / "afhq.zip").write_bytes(b"PK not really")
    with pytest.raises(UserError, match="not a readable zip archive"):
        afhq.unpack(tmp_path / "afhq.zip", tmp_path / "data", progress=False)


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    url, handler = server
    handler.cut_after = 1000
    with pytest.raises(UserError, match="stopped early; run the same command again"):
        download(url, tmp_path / "afhq.zip", progress=False)
    assert (tmp_path / "afhq.zip.part").stat().st_size == 1000
    target = download(url, tmp_path / "afhq.zip", progress=False)
    assert handler.ranges == [0, 1000]
    assert target.read_bytes() == handler.payload


def test_the_command_downloads_and_unpacks(server, tmp_path, capsys):
    url, _ = server
    assert afhq.main(["--url", url, "--dest", str(tmp_path / "data")]) == 0
    assert "3 cat images" in capsys.readouterr().out
    assert not (tmp_path / "data" / "afhq.zip").exists()


def test_offline_gives_a_clear_message(tmp_path, capsys):
    assert afhq.main(["--url", "http://127.0.0.1:9/afhq.zip", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "--archive" in err and "Traceback" not in err
