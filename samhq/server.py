"""An HTTP server for click-to-segment: upload an image once, then prompt it as often as you like.

    samhq serve --model samhq-tiny-shapes --port 8000     # then open http://127.0.0.1:8000/

    POST /api/images   multipart field "file"  -> {"image_id", "width", "height"}
    POST /api/segment  {"image_id", "points": [[x, y], ...], "labels": [1 or 0, ...], "box": [x0, y0, x1, y1],
                        "multimask": false, "hq_token_only": false}
                       -> {"score", "area", "bbox": [x, y, w, h], "mask_png": base64 PNG (0 / 255)}
    GET  /api/info     -> the model's name, sizes and limits
    GET  /             -> a web page that does all of this with clicks and drags

Uploads go through the same intake as every other entry point (`samhq.image_io`: EXIF orientation,
modes, bit depth, the pixel limit checked before decoding). Image embeddings are kept for the
`max_images` most recently used images (keyed by the file's SHA-256), so every click costs only the
prompt decoder.

Limits (`samhq.limits.Limits`, checked before the work): upload bytes (the body is counted as it
streams in and refused at the limit), JSON request bytes, image pixels, points + boxes per request.
Over a limit: HTTP 413 with the limit and the option that raises it. Bad input: 400 with the reason
(never the request echoed back, never a traceback).

Exposure: bound to loopback (the default), the server answers only requests whose Host header is a
loopback name (`localhost`, `127.0.0.1`, `[::1]`), which defeats DNS rebinding; POSTs from another
origin (a page on another site posting an upload) are refused by their Origin / Sec-Fetch-Site
headers. Behind a proxy, name the public host and origin: `allowed_hosts` / `--allowed-hosts`,
`allowed_origins` / `--allowed-origins`. Needs the `serve` extra (FastAPI, uvicorn, python-multipart).
"""

import base64
import hashlib
import io
import logging
import threading
from collections import OrderedDict
from importlib import resources
from urllib.parse import urlsplit

import numpy as np

from .checkpoints import NonFiniteOutputError, require_finite
from .image_io import check_image_size, open_image, to_rgb_array
from .limits import LimitError, Limits, check_body_size, check_prompt_count, get_limits
from .masks import mask_bbox
from .predictor import SamHQPredictor

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
UPLOAD_PATHS = ("/api/images",)
log = logging.getLogger("samhq.server")


class UnknownImage(KeyError):
    pass


class SegmentSession:
    """A predictor plus a least-recently-used cache of image embeddings; safe to call from several threads."""

    def __init__(self, predictor: SamHQPredictor, max_images: int = 8, limits: Limits | None = None,
                 bit_depth: str = "dtype"):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.predictor, self.max_images = predictor, max_images
        self.limits, self.bit_depth = limits or get_limits(), bit_depth
        self.embeddings: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def add_image(self, data: bytes) -> dict:
        """Embed an encoded image file (PNG, JPEG, ...) -> {"image_id", "width", "height"} (upright by its EXIF)."""
        check_body_size(len(data), self.limits.max_upload_bytes, "max_upload_bytes")
        image = to_rgb_array(open_image(data, self.limits, name="the upload"), bit_depth=self.bit_depth, limits=self.limits)
        check_image_size(*image.shape[:2])
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with self.lock:
            if image_id not in self.embeddings:
                self.predictor.set_image(image)
                self.embeddings[image_id] = self.predictor.export_image_embedding()
            self._use(image_id)
        return {"image_id": image_id, "width": int(image.shape[1]), "height": int(image.shape[0])}

    def _use(self, image_id: str) -> None:
        """Mark an image as just used, and drop the least recently used beyond `max_images` (lock held)."""
        self.embeddings.move_to_end(image_id)
        while len(self.embeddings) > self.max_images:
            self.embeddings.popitem(last=False)

    def segment(self, image_id: str, points=None, labels=None, box=None, multimask: bool = False,
                hq_token_only: bool = False) -> dict:
        """One object's mask from points (x, y) with labels (1 object, 0 background) and/or a box."""
        from PIL import Image

        points = points or None
        check_prompt_count(len(points or ()), 0 if box is None else 1, self.limits)
        if points is not None and labels is None:
            labels = [1] * len(points)
        with self.lock:
            if image_id not in self.embeddings:
                raise UnknownImage(image_id)
            self._use(image_id)
            self.predictor.set_image_embedding(self.embeddings[image_id])
            masks, scores, _ = self.predictor.predict(
                point_coords=None if points is None else np.asarray(points, dtype=float),
                point_labels=None if points is None else np.asarray(labels),
                box=None if box is None else np.asarray(box, dtype=float),
                multimask_output=multimask, hq_token_only=hq_token_only,
            )
        require_finite(scores, "scores")
        # plain SAM and SAM 2 return three candidates with multimask (HQ-SAM 2's HQ mask alone is one, with three scores)
        best = int(np.argmax(scores)) if len(scores) == len(masks) else 0
        mask, score = masks[best], float(np.max(scores))
        png = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(png, format="PNG")
        return {"score": score, "area": int(mask.sum()), "bbox": mask_bbox(mask),
                "mask_png": base64.b64encode(png.getvalue()).decode("ascii")}


def page_html() -> str:
    return resources.files("samhq").joinpath("web/index.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Request guard: Host allow-list, same-origin writes, body size limits (checked before any work)


def _hostname(host: str) -> str:
    """The name in a Host header or URL netloc, without port or brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def host_allowed(host: str, allowed) -> bool:
    """Whether a Host header names one of `allowed` ("*" any; "*.example.com" any sub-domain)."""
    name = _hostname(host)
    for pattern in allowed:
        pattern = pattern.strip().lower()
        if pattern == "*" or name == _hostname(pattern) or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def cross_origin_reason(headers, allowed_origins) -> str | None:
    """Why a state-changing request looks cross-origin (None when it does not).

    A browser sends Origin with every POST; it must be this server's own origin (its host and port
    equal the Host header) or one of `allowed_origins`. Without Origin, Sec-Fetch-Site must not say
    "cross-site" or "same-site". Clients that send neither (curl, scripts) are not browsers and pass.
    """
    origin, site = headers.get("origin"), headers.get("sec-fetch-site")
    if origin is not None:
        if "*" in allowed_origins or origin.rstrip("/") in allowed_origins:
            return None
        netloc = urlsplit(origin).netloc if origin != "null" else "null"
        if netloc and netloc.lower() == headers.get("host", "").lower():
            return None
        return f"cross-origin request from {origin[:100]!r} refused"
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site[:40]})"
    return None


def _guard_middleware(limits: Limits, allowed_hosts, allowed_origins):
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    class BodyTooLarge(HTTPException):  # an HTTPException, so FastAPI's body parsing passes it on unchanged
        pass

    hosts_text = ", ".join(allowed_hosts)

    class RequestGuard:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            headers = Headers(scope=scope)
            problem = None
            if not host_allowed(headers.get("host", ""), allowed_hosts):
                problem = (400, f"Host header {headers.get('host', '')[:100]!r} is not allowed; this server answers "
                                f"{hosts_text} (add names with --allowed-hosts, or create_app(allowed_hosts=...))")
            elif scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                reason = cross_origin_reason(headers, allowed_origins)
                if reason:
                    problem = (403, f"{reason}: uploads and prompts are accepted from this server's own page only "
                                    "(allow other origins with --allowed-origins, or create_app(allowed_origins=...))")
            limit_name = "max_upload_bytes" if scope["path"] in UPLOAD_PATHS else "max_request_bytes"
            maximum = getattr(limits, limit_name)
            length = headers.get("content-length", "")
            if problem is None and length.isdigit():
                try:
                    check_body_size(int(length), maximum, limit_name)
                except LimitError as e:
                    problem = (413, str(e))
            if problem is not None:
                return await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)

            seen = 0

            async def counted_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    try:
                        check_body_size(seen, maximum, limit_name)
                    except LimitError as e:  # stop reading: the rest of the body is never taken in
                        raise BodyTooLarge(413, str(e)) from None
                return message

            await self.app(scope, counted_receive, send)

    return RequestGuard


def _validation_message(errors) -> str:
    """FastAPI / pydantic validation errors as one short line, without the input they were given."""
    parts = []
    for err in list(errors)[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}"[:150])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more


# ---------------------------------------------------------------------------------------------


def create_app(model="samhq-tiny-shapes", device: str = "cpu", max_images: int = 8, limits: Limits | None = None,
               host: str = "127.0.0.1", allowed_hosts=None, allowed_origins=(), bit_depth: str = "dtype",
               name: str | None = None):
    """A FastAPI app serving `model` (any source `samhq.load_model` takes, or a SamHQModel / SamHQ2Model; `name` for
    /api/info).

    limits: `samhq.limits.Limits` (default: the process-wide ones). host: the address the server
    listens on; bound to a loopback address only loopback Host headers are answered unless
    `allowed_hosts` names others ("*" for any; any Host is answered when bound elsewhere).
    allowed_origins: origins (e.g. "https://seg.example.org") whose pages may POST besides the
    server's own. bit_depth: how uploads with more than 8 bits become 8-bit (see `samhq.image_io`).
    """
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from pydantic import BaseModel, Field
    except ImportError:
        raise ImportError("the server needs FastAPI: pip install 'samhq[serve]'") from None

    limits = limits or get_limits()
    if allowed_hosts is None:
        allowed_hosts = LOOPBACK_HOSTS if _hostname(host) in LOOPBACK_HOSTS else ("*",)
    allowed_hosts = tuple(allowed_hosts)
    allowed_origins = tuple(o.rstrip("/") for o in allowed_origins)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        predictor, name = SamHQPredictor.from_pretrained(model, device=device), str(model)
    else:
        predictor, name = SamHQPredictor(model), name or type(model).__name__
    session = SegmentSession(predictor, max_images, limits, bit_depth)

    class SegmentRequest(BaseModel):
        image_id: str = Field(max_length=64)
        points: list[list[float]] = Field(default_factory=list)
        labels: list[int] | None = None
        box: list[float] | None = None
        multimask: bool = False
        hq_token_only: bool = False

    app = FastAPI(title="samhq", description="SAM-HQ click-to-segment")
    app.state.session = session
    app.add_middleware(_guard_middleware(limits, allowed_hosts, allowed_origins))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return JSONResponse({"detail": _validation_message(exc.errors())}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.exception("samhq serve: internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); see the server's log"},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page_html()

    @app.get("/api/info")
    def info():
        return {"model": name, "image_size": predictor.image_size, "hq": bool(predictor.engine.hq_enabled),
                "device": str(predictor.device), "max_images": max_images, "max_pixels": limits.max_pixels,
                "max_prompts": limits.max_prompts, "max_upload_bytes": limits.max_upload_bytes}

    @app.post("/api/images")
    def upload(file: UploadFile = File(...)):
        try:
            return session.add_image(file.file.read(limits.max_upload_bytes + 1))
        except LimitError as e:
            raise HTTPException(413, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @app.post("/api/segment")
    def segment(req: SegmentRequest):
        try:
            return session.segment(req.image_id, req.points, req.labels, req.box, req.multimask, req.hq_token_only)
        except UnknownImage:
            raise HTTPException(404, f"unknown image_id {req.image_id!r}: upload the image first (POST /api/images); "
                                f"the server keeps the {max_images} most recently used images") from None
        except LimitError as e:
            raise HTTPException(413, str(e)) from None
        except NonFiniteOutputError as e:
            raise HTTPException(500, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    return app
