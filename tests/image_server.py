"""A local web server of images, for crawling tests (tests/test_img2dataset.py): real JPEG photos made from the
embedded digits, and the faults a crawl of the web meets.

    with ImageServer(hang_s=5) as server:
        rows = server.rows(good=32, uncaptioned=2, missing=4, hanging=2, truncated=3, html=3)  # (url, caption, kind)
        ...                                                                   # crawl the rows' urls
        server.requests  # Counter of the paths asked for

Paths (n: any number >= 0; photo n shows digit n % 1797 of scikit-learn's digits):
    /photo/<n>.jpg      200 image/jpeg: a photo-like JPEG, 128..224 px a side, the digit upscaled, tinted, noisy
    /missing/<n>.jpg    404
    /hang/<n>.jpg       nothing for `hang_s` seconds (past a crawler's timeout), then the connection closes
    /truncated/<n>.jpg  200 image/jpeg: the first 40% of photo n's JPEG (its Content-Length matches: the response is
                        whole, the JPEG is not)
    /html/<n>.jpg       200 text/html: a web page where the image should be (a login wall, a soft 404)

Row kinds (`rows`): good, uncaptioned (a photo whose caption is empty: no alt text), missing, hanging, truncated,
html.

The captions of photos and truncated photos name the digit ("a photo of the number seven"). The server listens on
127.0.0.1 only, on a free port, in a daemon thread (one thread per request, so a hanging response holds up no
other); leaving the `with` block releases the hanging responses and closes it.
"""

from __future__ import annotations

import collections
import functools
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from mmjax.data import digits

KINDS = ('good', 'uncaptioned', 'missing', 'hanging', 'truncated', 'html')
_PATHS = {'good': 'photo', 'uncaptioned': 'photo', 'missing': 'missing', 'hanging': 'hang', 'truncated': 'truncated',
          'html': 'html'}
CAPTIONED = ('good', 'truncated')  # rows whose caption names the digit; 'uncaptioned' rows have '' (no alt text)
TRUNCATE_AT = 0.4
HTML = (b'<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Please sign in to see this '
        b'image</h1></body></html>')


@functools.lru_cache(maxsize=1)
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download (as in mmjax/data/digits.py)

    loaded = load_digits()
    return loaded.images, loaded.target


def label(n: int) -> int:
    """The digit photo n shows."""
    return int(_digit_images()[1][n % len(_digit_images()[1])])


def caption(n: int) -> str:
    return f'a photo of the number {digits.CLASS_NAMES[label(n)]}'


@functools.lru_cache(maxsize=256)
def photo(n: int) -> bytes:
    """JPEG bytes of photo n: digit n upscaled to 128..224 px, ink and paper in random colours, sensor noise."""
    rng = np.random.default_rng([7, n])
    side = int(rng.integers(128, 225))
    gray = np.asarray(digits.upsample(_digit_images()[0][n % len(_digit_images()[0])], side), np.float32) / 255.0
    paper, ink = rng.uniform(150, 255, 3), rng.uniform(0, 110, 3)
    pixels = paper * (1.0 - gray[..., None]) + ink * gray[..., None] + rng.normal(0, 8, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


class ImageServer:
    """The server (see the module docstring); `url(kind, n)`, `rows(...)`, `requests`."""

    def __init__(self, hang_s: float = 5.0):
        self.hang_s = float(hang_s)
        self.requests: collections.Counter = collections.Counter()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name='image-server', daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def url(self, kind: str, n: int) -> str:
        return f'http://127.0.0.1:{self.port}/{_PATHS[kind]}/{n}.jpg'

    def rows(self, **counts: int) -> list[tuple[str, str, str]]:
        """(url, caption, kind) rows, `counts[kind]` of each kind (KINDS), each kind spread evenly over the list (so
        every stretch of it, a crawl's shard, holds its share of each fault); row i shows photo i."""
        unknown = set(counts) - set(KINDS)
        if unknown:
            raise ValueError(f'unknown kinds {sorted(unknown)}; choose from {KINDS}')
        placed = sorted(((i + 0.5) / count, KINDS.index(kind), kind) for kind, count in counts.items()
                        for i in range(count))
        out = []
        for n, (_, _, kind) in enumerate(placed):
            if kind in CAPTIONED or kind == 'uncaptioned':
                photo(n)  # drawn now: a crawler's short timeout must not run out while it is made
            text = caption(n) if kind in CAPTIONED else '' if kind == 'uncaptioned' else f'a photo of item {n}'
            out.append((self.url(kind, n), text, kind))
        return out

    def _handler_class(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # the name http.server calls
                with server._lock:
                    server.requests[self.path] += 1
                parts = self.path.strip('/').split('/')
                try:
                    route, n = parts[0], int(parts[1].split('.')[0])
                except (IndexError, ValueError):
                    route, n = '', 0
                if route == 'photo':
                    self._send(200, 'image/jpeg', photo(n))
                elif route == 'truncated':
                    data = photo(n)
                    self._send(200, 'image/jpeg', data[:int(len(data) * TRUNCATE_AT)])
                elif route == 'html':
                    self._send(200, 'text/html; charset=utf-8', HTML)
                elif route == 'hang':
                    server._release.wait(server.hang_s)  # says nothing; the client's timeout runs out first
                    self.close_connection = True
                else:
                    self._send(404, 'text/plain', b'not found')

            def _send(self, status, content_type, body):
                self.send_response(status)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # the test's output stays quiet
                pass

        return Handler
