"""An HTTP server for click-to-segment: upload an image once, then prompt it as often as you like.

    samhq serve --model samhq-tiny-shapes --port 8000     # then open http://127.0.0.1:8000/

    POST /api/images   multipart field "file"  -> {"image_id", "width", "height", "tiled"}
    POST /api/segment  {"image_id", "points": [[x, y], ...], "labels": [1 or 0, ...], "box": [x0, y0, x1, y1],
                        "multimask": false, "hq_token_only": false}
                       -> {"score", "area", "bbox": [x, y, w, h], "mask_png": base64 PNG (0 / 255)}
    POST /api/export   {"image_id", "format": "coco" | "yolo" | "labelme" | "png", "file_name",
                        "objects": [{"label", "points", "labels", "box", "multimask", "hq_token_only"}, ...]}
                       -> the image's objects as a file of that format (`samhq.formats`): COCO or LabelMe
                          JSON, or a zip (YOLO: data.yaml + labels/; PNG: one mask per object + labels)
    GET  /api/info     -> the model's name, sizes and limits
    GET  /             -> a labelling page: click or drag objects, name them, refine them, download

Uploads go through the same intake as every other entry point (`samhq.image_io`: EXIF orientation,
modes, bit depth, the pixel limit checked before decoding). Image embeddings are kept for the
`max_images` most recently used images (keyed by the file's SHA-256; `samhq.predictor.EmbeddingCache`),
so every click costs only the prompt decoder. With `tiles` (`samhq serve --tiles`) an upload larger
than a tile is segmented in tiles at its own resolution (`samhq.tiles.TiledPredictor`): its windows
are embedded when a prompt first needs them and kept in one memory-bounded cache.

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
import contextlib
import hashlib
import io
import json
import logging
import threading
from importlib import resources
from urllib.parse import urlsplit

import numpy as np

from .checkpoints import NonFiniteOutputError, require_finite
from .image_io import check_image_size, open_image, to_rgb_array
from .limits import (
    LimitError,
    Limits,
    as_tiled_error,
    check_body_size,
    check_pixels,
    check_prompt_count,
    get_limits,
    tiled_limits,
)
from .masks import best_mask, mask_bbox
from .predictor import EmbeddingCache, SamHQPredictor

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
UPLOAD_PATHS = ("/api/images",)
log = logging.getLogger("samhq.server")


class UnknownImage(KeyError):
    pass


class TiledImage:
    """An upload segmented in tiles: its pixels, kept while it is among the recently used images (its window
    embeddings live in the session's window cache)."""

    def __init__(self, rgb: np.ndarray):
        from .tiles import ArraySource

        self.source = ArraySource(rgb)
        self.nbytes = rgb.nbytes


EXPORT_FORMATS = ("coco", "yolo", "labelme", "png")


class SegmentSession:
    """A predictor plus a least-recently-used cache of images (`samhq.predictor.EmbeddingCache`); safe to
    call from several threads.

    max_images: the images kept (their embeddings, or for tiled uploads their pixels). tiles: None,
    or `samhq.tiles.TiledPredictor` options ({} for its defaults: tiles of the model's input size):
    an upload whose long side exceeds the tile size is then segmented in tiles at its own resolution
    (up to `limits.max_tiled_pixels`), its window embeddings made when a prompt first needs them and
    kept in one cache of `tile_cache_bytes` shared by all tiled images. Other uploads stay under
    `limits.max_pixels`.
    """

    def __init__(self, predictor: SamHQPredictor, max_images: int = 8, limits: Limits | None = None,
                 bit_depth: str = "dtype", tiles: dict | None = None, tile_cache_bytes: int = 2**30):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.predictor, self.max_images = predictor, max_images
        self.limits, self.bit_depth = limits or get_limits(), bit_depth
        self.embeddings = EmbeddingCache(max_items=max_images)
        self.lock = threading.Lock()
        self.tiled = None
        if tiles is not None:
            from .tiles import TiledPredictor

            # its own predictor over the same model: the tiled one tracks which window's embedding is set on it
            self.tiled = TiledPredictor(SamHQPredictor(predictor.model), cache=EmbeddingCache(max_bytes=tile_cache_bytes),
                                        **tiles)

    def add_image(self, data: bytes) -> dict:
        """Embed an encoded image file (PNG, JPEG, ...) -> {"image_id", "width", "height", "tiled"} (upright by its EXIF).

        A tiled upload is not embedded here: its windows are, as prompts need them."""
        check_body_size(len(data), self.limits.max_upload_bytes, "max_upload_bytes")
        limits = self.limits if self.tiled is None else tiled_limits(self.limits)  # whole-image uploads: checked below
        try:
            image = to_rgb_array(open_image(data, limits, name="the upload"), bit_depth=self.bit_depth, limits=limits)
        except LimitError as e:
            raise e if self.tiled is None else as_tiled_error(e) from None
        h, w = image.shape[:2]
        tiled = self.tiled is not None and max(h, w) > self.tiled.tile_size
        if not tiled:
            check_pixels(w, h, self.limits)
            check_image_size(h, w)
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with self.lock:
            if self.embeddings.get(image_id) is None:
                if tiled:
                    self.embeddings.put(image_id, TiledImage(image))
                else:
                    self.predictor.set_image(image)
                    self.embeddings.put(image_id, self.predictor.export_image_embedding())
        return {"image_id": image_id, "width": int(w), "height": int(h), "tiled": tiled}

    def _mask(self, image_id: str, points, labels, box, multimask: bool, hq_token_only: bool) -> tuple[np.ndarray, float]:
        """One object's full-size mask and score (lock held)."""
        entry = self.embeddings.get(image_id)  # a use: it becomes the most recently used
        if entry is None:
            raise UnknownImage(image_id)
        prompt = dict(point_coords=None if points is None else np.asarray(points, dtype=float),
                      point_labels=None if points is None else np.asarray(labels),
                      box=None if box is None else np.asarray(box, dtype=float),
                      multimask_output=multimask, hq_token_only=hq_token_only, return_low_res=False)
        if isinstance(entry, TiledImage):
            if self.tiled.key != image_id:
                self.tiled.set_image(entry.source, key=image_id)
            masks, scores, _ = self.tiled.predict(**prompt)
        else:
            self.predictor.set_image_embedding(entry)
            masks, scores, _ = self.predictor.predict(**prompt)
        require_finite(scores, "scores")
        mask, score = best_mask(masks, scores)
        return mask, float(score)

    def _prompts(self, points, labels, box):
        points = points or None
        check_prompt_count(len(points or ()), 0 if box is None else 1, self.limits)
        if points is not None and labels is None:
            labels = [1] * len(points)
        return points, labels, box

    def segment(self, image_id: str, points=None, labels=None, box=None, multimask: bool = False,
                hq_token_only: bool = False) -> dict:
        """One object's mask from points (x, y) with labels (1 object, 0 background) and/or a box."""
        from PIL import Image

        points, labels, box = self._prompts(points, labels, box)
        with self.lock:
            mask, score = self._mask(image_id, points, labels, box, multimask, hq_token_only)
        png = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(png, format="PNG")
        return {"score": score, "area": int(mask.sum()), "bbox": mask_bbox(mask),
                "mask_png": base64.b64encode(png.getvalue()).decode("ascii")}

    def export(self, image_id: str, objects: list[dict], fmt: str, file_name: str = "image.png") -> tuple[str, str, bytes]:
        """An image's labelled objects in an annotation format -> (download file name, media type, bytes).

        objects: [{"label": name, "points", "labels", "box", "multimask", "hq_token_only"}]: each
        object's mask is made again from its prompts (as `segment` made it for the page). Categories
        are the labels in order of first use (ids 1, 2, ...). fmt: coco (instances JSON), labelme
        (its JSON), yolo (a zip of data.yaml and labels/NAME.txt), png (a zip of NAME_masks/NNN.png, one
        0/255 PNG per object, and NAME_labels.json, each PNG's label). The files are `samhq.formats`'.
        """
        from .formats import dataset_files, image_files

        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
        if not objects:
            raise ValueError("no objects to export: finish an object first")
        if len(objects) > self.limits.max_prompts:
            raise LimitError(f"{len(objects)} objects in one export, over the limit of {self.limits.max_prompts} "
                             "(max_prompts)", "max_prompts", len(objects), self.limits.max_prompts)
        file_name = _safe_name(file_name)
        stem = file_name.rsplit(".", 1)[0] or "image"
        categories: dict[str, int] = {}
        found = []
        for o in objects:
            label = str(o.get("label") or "object").strip() or "object"
            points, labels, box = self._prompts(o.get("points"), o.get("labels"), o.get("box"))
            if points is None and box is None:
                raise ValueError(f"object {label!r} has no clicks or box")
            found.append((label, points, labels, box, bool(o.get("multimask")), bool(o.get("hq_token_only"))))
            categories.setdefault(label, len(categories) + 1)
        with self.lock:
            masks = [self._mask(image_id, p, lab, b, mm, hq) + (categories[label],) for label, p, lab, b, mm, hq in found]
        h, w = masks[0][0].shape
        image = {"file_name": file_name, "name": stem, "height": h, "width": w,
                 "objects": [{"segmentation": m, "score": s, "category_id": c} for m, s, c in masks]}
        cats = {cid: label for label, cid in categories.items()}
        files = dict(dataset_files([image], [fmt], cats) if fmt in ("coco", "yolo") else {})
        files.update(image_files(image, [fmt], cats) if fmt != "coco" else {})
        if fmt == "coco":
            return f"{stem}_coco.json", "application/json", files["coco/instances.json"].encode("utf-8")
        if fmt == "labelme":
            return f"{stem}.json", "application/json", files[f"labelme/{stem}.json"].encode("utf-8")
        if fmt == "png":
            files[f"{stem}_labels.json"] = json.dumps({f"{i:03d}.png": found[i][0] for i in range(len(found))}, indent=1)
        return f"{stem}_{fmt}.zip", "application/zip", _zip(files)


def _safe_name(name: str) -> str:
    """A file name for downloads and the formats' image paths: its last part, letters, digits, '.', '-', '_' only."""
    import re

    base = re.split(r"[\\/]", str(name))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:120]
    return base or "image.png"


def _zip(files: dict) -> bytes:
    """`samhq.formats` file data (text, bytes, or a folder's {name: bytes}) as a zip archive."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            if isinstance(data, dict):
                for name, blob in data.items():
                    z.writestr(f"{rel}/{name}", blob)
            else:
                z.writestr(rel, data)
    return buf.getvalue()


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


def create_app(model="samhq-tiny-shapes", device: str | None = None, max_images: int = 8, limits: Limits | None = None,
               host: str = "127.0.0.1", allowed_hosts=None, allowed_origins=(), bit_depth: str = "dtype",
               name: str | None = None, tiles: dict | None = None, tile_cache_bytes: int = 2**30):
    """A FastAPI app serving `model` (any source `samhq.load_model` takes, or a SamHQModel / SamHQ2Model; `name` for
    /api/info). device: a torch device ("cuda"); None: a model object's own device, the CPU for a checkpoint.

    limits: `samhq.limits.Limits` (default: the process-wide ones). host: the address the server
    listens on; bound to a loopback address only loopback Host headers are answered unless
    `allowed_hosts` names others ("*" for any; any Host is answered when bound elsewhere).
    allowed_origins: origins (e.g. "https://seg.example.org") whose pages may POST besides the
    server's own. bit_depth: how uploads with more than 8 bits become 8-bit (see `samhq.image_io`).
    tiles: None, or `samhq.tiles.TiledPredictor` options ({} for the defaults): uploads larger than a
    tile are segmented in tiles at their own resolution (`SegmentSession`), their window embeddings
    kept within tile_cache_bytes.
    """
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response
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
        from .pipelines import load_for_inference  # a copy on `device` when the object is elsewhere; eval mode

        predictor, name = SamHQPredictor(load_for_inference(model, device)), name or type(model).__name__
    session = SegmentSession(predictor, max_images, limits, bit_depth, tiles, tile_cache_bytes)

    class SegmentRequest(BaseModel):
        image_id: str = Field(max_length=64)
        points: list[list[float]] = Field(default_factory=list)
        labels: list[int] | None = None
        box: list[float] | None = None
        multimask: bool = False
        hq_token_only: bool = False

    class ExportObject(BaseModel):
        label: str = Field(default="object", max_length=200)
        points: list[list[float]] = Field(default_factory=list)
        labels: list[int] | None = None
        box: list[float] | None = None
        multimask: bool = False
        hq_token_only: bool = False

    class ExportRequest(BaseModel):
        image_id: str = Field(max_length=64)
        format: str = Field(max_length=20)
        file_name: str = Field(default="image.png", max_length=255)
        objects: list[ExportObject]

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
                "max_prompts": limits.max_prompts, "max_upload_bytes": limits.max_upload_bytes,
                "tiles": None if session.tiled is None else {
                    "tile_size": session.tiled.tile_size, "overlap": session.tiled.overlap,
                    "max_tiled_pixels": limits.max_tiled_pixels},
                "export_formats": list(EXPORT_FORMATS)}

    @contextlib.contextmanager
    def http_errors(image_id: str | None = None):
        """samhq's errors as HTTP statuses, the same for every route: unknown image 404, over a limit 413,
        non-finite model output 500, any other bad input 400; each with its one-line message."""
        try:
            yield
        except UnknownImage:
            raise HTTPException(404, f"unknown image_id {image_id!r}: upload the image first (POST /api/images); "
                                f"the server keeps the {max_images} most recently used images") from None
        except LimitError as e:
            raise HTTPException(413, str(e)) from None
        except NonFiniteOutputError as e:
            raise HTTPException(500, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @app.post("/api/images")
    def upload(file: UploadFile = File(...)):
        with http_errors():
            return session.add_image(file.file.read(limits.max_upload_bytes + 1))

    @app.post("/api/segment")
    def segment(req: SegmentRequest):
        with http_errors(req.image_id):
            return session.segment(req.image_id, req.points, req.labels, req.box, req.multimask, req.hq_token_only)

    @app.post("/api/export")
    def export(req: ExportRequest):
        with http_errors(req.image_id):
            filename, media_type, body = session.export(req.image_id, [o.model_dump() for o in req.objects], req.format,
                                                        req.file_name)
        return Response(body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return app
