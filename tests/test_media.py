"""glmrt serve's media policy at the door: images in a format outside the allow-list are refused
with a 400 naming their field, before anything decodes them."""
import asyncio
import base64
import io

import pytest
from PIL import Image

pytest.importorskip("httpx")
from glmrt.server.media import MediaLoader, MediaPolicy  # noqa: E402
from glmrt.server.protocol import APIError, ImageRef  # noqa: E402
from glmrt_testing.documents import POSTSCRIPT  # noqa: E402

FIELD = "messages[0].content[1].image_url"


def load(loader: MediaLoader, url: str, documents: bool = False) -> bytes:
    return asyncio.run(loader.load(ImageRef(url, FIELD), documents))


def test_postscript_is_refused_naming_its_field(tmp_path):
    (tmp_path / "page.png").write_bytes(POSTSCRIPT)
    loader = MediaLoader(MediaPolicy(allowed_local_path=tmp_path))
    uri = "data:image/png;base64," + base64.b64encode(POSTSCRIPT).decode()
    for url, documents in ((uri, False), (uri, True), ((tmp_path / "page.png").as_uri(), False)):
        with pytest.raises(APIError) as info:
            load(loader, url, documents)
        assert info.value.param == FIELD and info.value.status == 400
        assert info.value.message.startswith(f"'{FIELD}': EPS images are not accepted (only PNG, JPEG")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert load(loader, "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()) == png.getvalue()
