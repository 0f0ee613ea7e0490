"""An HTTP server for click-to-segment: upload an image once, then prompt it as often as you like.

    samhq serve --model samhq-tiny-shapes --port 8000     # then open http://127.0.0.1:8000/

    POST /api/images   multipart field "file"  -> {"image_id", "width", "height"}
    POST /api/segment  {"image_id", "points": [[x, y], ...], "labels": [1 or 0, ...], "box": [x0, y0, x1, y1],
                        "multimask": false, "hq_token_only": false}
                       -> {"score", "area", "bbox": [x, y, w, h], "mask_png": base64 PNG (0 / 255)}
    GET  /api/info     -> the model's name and sizes
    GET  /             -> a web page that does all of this with clicks and drags

Image embeddings are kept for the most recent `max_images` uploads (keyed by the file's SHA-256), so
every click costs only the prompt decoder. Needs the `serve` extra (FastAPI, uvicorn, python-multipart).
"""

import base64
import hashlib
import io
import threading
from collections import OrderedDict
from importlib import resources

import numpy as np

from .image_io import check_image_size, to_rgb_array
from .masks import mask_bbox
from .predictor import SamHQPredictor


class UnknownImage(KeyError):
    pass


class SegmentSession:
    """A predictor plus a small LRU of image embeddings; safe to call from several threads."""

    def __init__(self, predictor: SamHQPredictor, max_images: int = 8):
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        self.predictor, self.max_images = predictor, max_images
        self.embeddings: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def add_image(self, data: bytes) -> dict:
        """Embed an encoded image file (PNG, JPEG, ...) -> {"image_id", "width", "height"}."""
        from PIL import Image, UnidentifiedImageError

        try:
            image = to_rgb_array(Image.open(io.BytesIO(data)))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"could not read the upload as an image ({e}); send a PNG, JPEG or other PIL-readable file") from None
        check_image_size(*image.shape[:2])
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with self.lock:
            if image_id not in self.embeddings:
                self.predictor.set_image(image)
                self.embeddings[image_id] = self.predictor.export_image_embedding()
                while len(self.embeddings) > self.max_images:
                    self.embeddings.popitem(last=False)
            self.embeddings.move_to_end(image_id)
        return {"image_id": image_id, "width": int(image.shape[1]), "height": int(image.shape[0])}

    def segment(self, image_id: str, points=None, labels=None, box=None, multimask: bool = False,
                hq_token_only: bool = False) -> dict:
        """One object's mask from points (x, y) with labels (1 object, 0 background) and/or a box."""
        from PIL import Image

        points = points or None
        if points is not None and labels is None:
            labels = [1] * len(points)
        with self.lock:
            if image_id not in self.embeddings:
                raise UnknownImage(image_id)
            self.predictor.set_image_embedding(self.embeddings[image_id])
            masks, scores, _ = self.predictor.predict(
                point_coords=None if points is None else np.asarray(points, dtype=float),
                point_labels=None if points is None else np.asarray(labels),
                box=None if box is None else np.asarray(box, dtype=float),
                multimask_output=multimask, hq_token_only=hq_token_only,
            )
        best = int(np.argmax(scores))  # plain SAM weights return three candidates
        mask = masks[best]
        png = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(png, format="PNG")
        return {"score": float(scores[best]), "area": int(mask.sum()), "bbox": mask_bbox(mask),
                "mask_png": base64.b64encode(png.getvalue()).decode("ascii")}


def page_html() -> str:
    return resources.files("samhq").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(model="samhq-tiny-shapes", device: str = "cpu", max_images: int = 8, name: str | None = None):
    """A FastAPI app serving `model` (any source `from_pretrained` takes, or a SamHQModel); `name` for /api/info."""
    try:
        from fastapi import FastAPI, File, HTTPException, UploadFile
        from fastapi.responses import HTMLResponse
        from pydantic import BaseModel, Field
    except ImportError:
        raise ImportError("the server needs FastAPI: pip install 'samhq[serve]'") from None

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        predictor, name = SamHQPredictor.from_pretrained(model, device=device), str(model)
    else:
        predictor, name = SamHQPredictor(model), name or type(model).__name__
    session = SegmentSession(predictor, max_images)

    class SegmentRequest(BaseModel):
        image_id: str
        points: list[list[float]] = Field(default_factory=list)
        labels: list[int] | None = None
        box: list[float] | None = None
        multimask: bool = False
        hq_token_only: bool = False

    app = FastAPI(title="samhq", description="SAM-HQ click-to-segment")
    app.state.session = session

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page_html()

    @app.get("/api/info")
    def info():
        cfg = predictor.model.config
        return {"model": name, "image_size": cfg.vision_config.image_size, "hq": bool(predictor.model.hq_enabled),
                "device": str(predictor.device), "max_images": max_images}

    @app.post("/api/images")
    def upload(file: UploadFile = File(...)):
        try:
            return session.add_image(file.file.read())
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    @app.post("/api/segment")
    def segment(req: SegmentRequest):
        try:
            return session.segment(req.image_id, req.points, req.labels, req.box, req.multimask, req.hq_token_only)
        except UnknownImage:
            raise HTTPException(404, f"unknown image_id {req.image_id!r}: upload the image first (POST /api/images); "
                                f"the server keeps the last {max_images} images") from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None

    return app
