"""A Label Studio ML backend: SAM-HQ masks for Label Studio's smart tools and automatic pre-annotation.

    samhq label-studio --model sam_hq_vit_b.pth --port 9090 --label-studio-url http://localhost:8080 --api-key KEY

Label Studio's ML backend protocol (what Label Studio's `ml/api_connector.py` sends; the
label-studio-ml-backend package serves the same routes):

    GET  /health, GET /   -> {"status": "UP", "model_class": "samhq", "model_version": ...}
    POST /setup           {"project": "ID.TIMESTAMP", "schema": label config XML, ...}
                          -> {"model_version": ...}; 400 when the config has no BrushLabels / PolygonLabels
    POST /predict         {"tasks": [task, ...], "label_config": XML, "params": {"context": ...}}
                          -> {"results": [{"result": [region, ...], "score": s, "model_version": v}, ...]},
                          one prediction per task
    GET  /versions        -> {"versions": [model_version]}
    POST /webhook         -> 200 {"status": "ignored"} (Label Studio adds a webhook for every backend;
                          samhq does not train from annotation events)

Interactive pre-annotation (a task and a `context`, sent when an annotator uses a smart
KeyPointLabels or RectangleLabels tool): every keypoint in `context["result"]` is a click (positive
unless `is_positive` is false: Label Studio marks a click made with Alt as negative), the last
rectangle is the box (rotated ones by their axis-aligned bounds); several rectangles without clicks
give one mask each. The answer is one BrushLabels region (Label Studio's RLE) or PolygonLabels
regions (percent coordinates) with the prompt's label, on the first BrushLabels / PolygonLabels
control of the config that has that label and the same image.

Automatic pre-annotation (a task without context: Label Studio's "Retrieve predictions" action, or
tasks imported into a project whose "retrieve predictions automatically" is on): `auto="everything"`
(SAM's automatic mask generator, every mask a region), "point:X,Y" or "box:X0,Y0,X1,Y1" (a prompt
in percent of the image's width and height, e.g. "point:50,50" for the centre), or "none". The label
is `auto_label`, else the mask control's first label.

Coordinates: Label Studio gives positions in percent of the image, pixel-edge frame (0 the left edge,
100 the right edge). A position X in pixels (= percent * width / 100) becomes the SAM coordinate
X - 0.5, SAM's frame having pixel centres at integers: a click in the middle of pixel (i, j) is
the SAM point (j, i), a box from pixel edge to pixel edge encloses its pixels' centres by half a pixel.

Images: a task's image value is fetched from Label Studio (a path such as "/data/upload/1/a.png" or
"/data/local-files/?d=photos/a.png" is joined to `label_studio_url`; a full URL must be on Label
Studio's origin, or its host listed in `image_hosts`, which are fetched without the key). The key
goes in `Authorization: Token KEY` (a legacy token) or, for a personal access token (a JWT), is
exchanged at /api/token/refresh for `Authorization: Bearer ...`; it is never sent to another origin,
also not after a redirect. Each image (by the SHA-256 of its pixels) is embedded once while it is
among the last `max_images` used, by the interactive tools and the automatic generator alike.

Access: Label Studio calls the backend server to server, so browsers never need it. Requests whose
Host header is not `localhost`, `127.0.0.1`, `[::1]` or one of `allowed_hosts` (the name Label Studio
uses for the backend, e.g. `ml-backend` in Docker) get 400 (Starlette's TrustedHostMiddleware,
against DNS rebinding); cross-origin browser requests are allowed only from the Label Studio URL's
origin (CORSMiddleware); `basic_auth=(user, password)` requires HTTP basic auth, which Label Studio
sends when the model's "Basic auth" is set in the project's Model settings.
Needs the `serve` extra (FastAPI, uvicorn).
"""

import base64
import hashlib
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from .formats.writers import label_studio_result
from .image_io import to_rgb_array
from .limits import LimitError
from .masks import best_mask
from .predictor import EmbeddingCache, SamHQPredictor

MASK_TAGS = ("BrushLabels", "PolygonLabels")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
MAX_CONFIG_CHARS = 1_000_000


class ImageFetchError(ValueError):
    """The task's image could not be fetched from Label Studio (or is not an image)."""


# ---------------------------------------------------------------------------------------------
# Labelling config


@dataclass
class Control:
    tag: str  # BrushLabels, PolygonLabels, KeyPointLabels, RectangleLabels, ...
    name: str
    to_name: str
    labels: list[str] = field(default_factory=list)


@dataclass
class LabelConfig:
    controls: list[Control]
    images: dict[str, str]  # Image tag name -> task data key (value="$image" -> "image")

    @classmethod
    def parse(cls, xml: str) -> "LabelConfig":
        """Parse a Label Studio labelling config; ValueError for XML that does not parse."""
        if not isinstance(xml, str) or not xml.strip():
            raise ValueError("the labelling config is empty")
        if len(xml) > MAX_CONFIG_CHARS:
            raise ValueError(f"the labelling config is longer than {MAX_CONFIG_CHARS} characters")
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as e:
            raise ValueError(f"the labelling config is not valid XML: {e}") from None
        controls, images = [], {}
        for el in root.iter():
            if el.tag == "Image" and el.get("name") and (el.get("value") or "").startswith("$"):
                images[el.get("name")] = el.get("value")[1:]
            elif el.get("name") and el.get("toName"):
                labels = [lab.get("value") for lab in el.iter("Label") if lab.get("value") is not None]
                controls.append(Control(el.tag, el.get("name"), el.get("toName").split(",")[0], labels))
        return cls(controls, images)

    def mask_controls(self) -> list[Control]:
        return [c for c in self.controls if c.tag in MASK_TAGS and c.to_name in self.images]

    def mask_control(self, label: str | None = None, to_name: str | None = None) -> Control:
        """The first BrushLabels / PolygonLabels control on `to_name` that has `label` (any label when None)."""
        found = [c for c in self.mask_controls() if to_name is None or c.to_name == to_name]
        if not found:
            raise ValueError("the labelling config has no BrushLabels or PolygonLabels control on an Image: "
                             "add one (see `samhq.formats.label_studio_config`)")
        for c in found:
            if label is None or label in c.labels:
                return c
        raise ValueError(f"no BrushLabels / PolygonLabels control has the label {label!r}; "
                         f"give the mask control the same labels as the KeyPointLabels / RectangleLabels")


# ---------------------------------------------------------------------------------------------
# Images from Label Studio


class _KeepKeyOnOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping the Authorization header when one leaves the first URL's origin."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str]:
    p = urllib.parse.urlsplit(url)
    return p.scheme.lower(), p.netloc.lower()


class LabelStudioImages:
    """Fetches task images from Label Studio with its API key (see the module docstring)."""

    def __init__(self, url: str | None, api_key: str | None = None, image_hosts=(), timeout: float = 30.0,
                 max_bytes: int = 256 * 2**20):
        if url is not None:
            p = urllib.parse.urlsplit(url)
            if p.scheme not in ("http", "https") or not p.netloc:
                raise ValueError(f"the Label Studio URL must be http(s)://HOST[:PORT], got {url!r}")
            url = f"{p.scheme}://{p.netloc}{p.path.rstrip('/')}"
        self.url, self.api_key = url, api_key
        self.image_hosts = {h.lower() for h in image_hosts}
        self.timeout, self.max_bytes = timeout, max_bytes
        self._opener = urllib.request.build_opener(_KeepKeyOnOrigin)
        self._access: str | None = None
        self._lock = threading.Lock()

    @property
    def origin(self) -> str | None:
        return None if self.url is None else "{}://{}".format(*_origin(self.url))

    def resolve(self, value: str) -> tuple[str, bool]:
        """A task's image value -> (absolute URL, send the key?); ValueError for one we will not fetch."""
        if not isinstance(value, str) or not value:
            raise ImageFetchError(f"the task's image value must be a URL or a Label Studio path, got {value!r}")
        p = urllib.parse.urlsplit(value)
        if not p.scheme and value.startswith("/"):
            if self.url is None:
                raise ImageFetchError(f"the image {value!r} is on Label Studio, but no Label Studio URL is configured "
                                      "(--label-studio-url)")
            return self.url + value, True
        if p.scheme in ("http", "https") and p.netloc:
            if self.url is not None and _origin(value) == _origin(self.url):
                return value, True
            if (p.hostname or "").lower() in self.image_hosts:
                return value, False
            raise ImageFetchError(f"the image URL's host {p.hostname!r} is not Label Studio's; allow it with "
                                  f"--image-host {p.hostname} (fetched without the API key)")
        raise ImageFetchError(f"cannot fetch the image {value[:100]!r}: only Label Studio paths (/data/...) and "
                              "http(s) URLs are supported; serve images through Label Studio (uploads, local files, storages)")

    def _authorization(self, refresh: bool = False) -> str | None:
        key = self.api_key
        if not key:
            return None
        if key.count(".") != 2:  # a legacy token
            return f"Token {key}"
        with self._lock:  # a personal access token (JWT refresh token): exchange it for an access token
            if self._access is None or refresh:
                req = urllib.request.Request(self.url + "/api/token/refresh", data=json.dumps({"refresh": key}).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=self.timeout) as r:
                        self._access = json.loads(r.read())["access"]
                except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                    raise ImageFetchError(f"Label Studio refused the personal access token ({e}); check --api-key") from None
            return f"Bearer {self._access}"

    def fetch(self, value: str) -> bytes:
        url, with_key = self.resolve(value)
        for attempt in (0, 1):
            headers = {}
            auth = self._authorization(refresh=attempt == 1) if with_key else None
            if auth:
                headers["Authorization"] = auth
            try:
                with self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout) as r:
                    data = r.read(self.max_bytes + 1)
                if len(data) > self.max_bytes:
                    raise ImageFetchError(f"the image at {url} is larger than {self.max_bytes} bytes")
                return data
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0 and auth and auth.startswith("Bearer"):
                    continue  # the access token expired: refresh once
                hint = " (check --api-key)" if e.code in (401, 403) else ""
                raise ImageFetchError(f"Label Studio answered {e.code} {e.reason} for {url}{hint}") from None
            except (urllib.error.URLError, OSError) as e:
                raise ImageFetchError(f"could not fetch {url}: {getattr(e, 'reason', e)}") from None
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# A predictor that embeds each image once


class CachedEmbeddingPredictor(SamHQPredictor):
    """`SamHQPredictor` whose `set_image` reuses the embeddings of the last `max_images` images.

    Keyed by the SHA-256 of the RGB pixels, so the interactive tools and the automatic mask
    generator (which calls `set_image` on the whole image when it uses no crops) share them; the
    embeddings live in a `samhq.predictor.EmbeddingCache` (least recently used dropped first).
    """

    def __init__(self, model, engine: str = "torch", max_images: int = 8) -> None:
        super().__init__(model, engine)
        self.embeddings = EmbeddingCache(max_items=max_images)
        self.embedded = 0  # how many images were encoded (for tests and logs)

    def set_image(self, image, image_format: str = "RGB") -> None:
        rgb = to_rgb_array(image, image_format=image_format)
        key = hashlib.sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()
        cached = self.embeddings.get(key)
        if cached is not None:
            self.set_image_embedding(cached)
            return
        super().set_image(rgb)
        self.embeddings.put(key, self.export_image_embedding())
        self.embedded += 1


# ---------------------------------------------------------------------------------------------
# The backend


def _percent(v, name: str) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (percent of the image), got {v!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} is not finite")
    return v


def parse_auto(auto: str) -> tuple[str, list[float] | None]:
    """'everything' | 'none' | 'point:X,Y' | 'box:X0,Y0,X1,Y1' (percent) -> (mode, numbers)."""
    auto = (auto or "none").strip().lower()
    if auto in ("everything", "none"):
        return auto, None
    mode, _, rest = auto.partition(":")
    counts = {"point": 2, "box": 4}
    try:
        nums = [float(v) for v in rest.split(",")]
    except ValueError:
        nums = []
    if mode not in counts or len(nums) != counts[mode] or not all(0 <= v <= 100 for v in nums):
        raise ValueError(f"auto must be everything, none, point:X,Y or box:X0,Y0,X1,Y1 in percent (0..100), got {auto!r}")
    if mode == "box" and (nums[2] <= nums[0] or nums[3] <= nums[1]):
        raise ValueError(f"the automatic box {auto!r} must have X0 < X1 and Y0 < Y1")
    return mode, nums


class SamHQBackend:
    """The work behind the routes: prompts from Label Studio's context -> masks -> result regions.

    model: a `SamHQModel` or anything `SamHQModel.from_pretrained` takes. images: a
    `LabelStudioImages`. Thread-safe (one lock around the model).
    """

    def __init__(self, model, images: LabelStudioImages, *, device: str | None = None, dtype=None, max_images: int = 8,
                 auto: str = "everything", auto_label: str | None = None, multimask: bool = False,
                 hq_token_only: bool = False, polygon_tolerance: float = 1.0, points_per_side: int = 32,
                 pred_iou_thresh: float | None = None, stability_thresh: float = 0.95, model_version: str | None = None):
        from .automatic import SamHQAutomaticMaskGenerator
        from .pipelines import load_for_inference

        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        if polygon_tolerance < 0:
            raise ValueError(f"polygon_tolerance must be >= 0, got {polygon_tolerance}")
        self.auto = parse_auto(auto)
        name = str(model if isinstance(model, str) else type(model).__name__).rstrip("/").split("/")[-1]
        self.model_version = model_version or (name if name.startswith("samhq") else f"samhq-{name}")
        self.predictor = CachedEmbeddingPredictor(load_for_inference(model, device, dtype), max_images=max_images)
        self.generator = SamHQAutomaticMaskGenerator(self.predictor, points_per_side=points_per_side,
                                                     pred_iou_thresh=pred_iou_thresh,
                                                     stability_score_thresh=stability_thresh, output_mode="binary_mask")
        self.images, self.auto_label = images, auto_label
        self.multimask, self.hq_token_only, self.polygon_tolerance = multimask, hq_token_only, polygon_tolerance
        self.lock = threading.Lock()

    # -------------------------------------------------------------- images and masks

    def load_image(self, task: dict, config: LabelConfig, to_name: str) -> np.ndarray:
        from PIL import UnidentifiedImageError

        key = config.images.get(to_name)
        data = task.get("data") if isinstance(task, dict) else None
        if key is None or not isinstance(data, dict) or key not in data:
            raise ValueError(f"the task has no data[{key!r}] for the image {to_name!r}")
        raw = self.images.fetch(data[key])
        try:
            return to_rgb_array(raw)  # the one intake: size checked before decoding, EXIF applied
        except LimitError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as e:  # what Label Studio served is not an image
            raise ImageFetchError(f"the task's image {str(data[key])[:100]!r} is not an image PIL reads ({e})") from None

    def _predict(self, image, points, labels, box):
        with self.lock:
            self.predictor.set_image(image)
            masks, scores, _ = self.predictor.predict(
                point_coords=None if points is None else np.asarray(points, dtype=float),
                point_labels=None if points is None else np.asarray(labels),
                box=None if box is None else np.asarray(box, dtype=float),
                multimask_output=self.multimask, hq_token_only=self.hq_token_only, return_low_res=False)
        mask, score = best_mask(masks, scores)
        return mask, float(score)

    def _regions(self, mask, score, control: Control, label: str) -> list[dict]:
        kind = "brush" if control.tag == "BrushLabels" else "polygon"
        return label_studio_result(mask, label, kind, control.name, control.to_name, score,
                                   tolerance=self.polygon_tolerance)

    # -------------------------------------------------------------- prompts

    @staticmethod
    def prompts_from_context(context: dict, width: int, height: int):
        """Label Studio context -> (points, labels, boxes, label, to_name) in SAM's pixel frame."""
        points, labels, boxes, label, to_name = [], [], [], None, None
        items = context.get("result") if isinstance(context, dict) else None
        if not isinstance(items, list):
            raise ValueError("the context has no 'result' list of keypoints and rectangles")
        for item in items:
            kind = str(item.get("type", "")).lower() if isinstance(item, dict) else ""
            if kind not in ("keypointlabels", "rectanglelabels"):
                continue
            value = item.get("value") or {}
            names = value.get(kind) or []
            label = names[0] if names else label
            to_name = item.get("to_name", to_name)
            x = _percent(value.get("x"), "x") * width / 100
            y = _percent(value.get("y"), "y") * height / 100
            if kind == "keypointlabels":
                points.append([x - 0.5, y - 0.5])
                labels.append(0 if item.get("is_positive", True) is False else 1)
            else:
                w = _percent(value.get("width"), "width") * width / 100
                h = _percent(value.get("height"), "height") * height / 100
                if w <= 0 or h <= 0:
                    raise ValueError("a rectangle must have a positive width and height")
                a = math.radians(_percent(value.get("rotation", 0) or 0, "rotation"))
                corners = [(x + u * math.cos(a) - v * math.sin(a), y + u * math.sin(a) + v * math.cos(a))
                           for u, v in ((0, 0), (w, 0), (w, h), (0, h))]  # rotated about (x, y), clockwise on screen
                xs, ys = [c[0] for c in corners], [c[1] for c in corners]
                boxes.append([min(xs) - 0.5, min(ys) - 0.5, max(xs) - 0.5, max(ys) - 0.5])
        return points, labels, boxes, label, to_name

    def interactive(self, task: dict, context: dict, config: LabelConfig) -> dict:
        first = next((c for c in config.mask_controls()), None)
        probe = self.prompts_from_context(context, 100, 100)  # label and image name first; sizes come with the image
        if not probe[0] and not probe[2]:
            return {"result": [], "model_version": self.model_version}
        control = config.mask_control(probe[3], probe[4] or (first.to_name if first else None))
        image = self.load_image(task, config, control.to_name)
        height, width = image.shape[:2]
        points, labels, boxes, label, _ = self.prompts_from_context(context, width, height)
        label = label or (control.labels[0] if control.labels else "object")
        results, scores = [], []
        if points or len(boxes) <= 1:
            mask, score = self._predict(image, points or None, labels or None, boxes[-1] if boxes else None)
            results += self._regions(mask, score, control, label)
            scores.append(score)
        else:  # several boxes, no clicks: one object per box
            for box in boxes:
                mask, score = self._predict(image, None, None, box)
                results += self._regions(mask, score, control, label)
                scores.append(score)
        return {"result": results, "score": float(np.mean(scores)), "model_version": self.model_version}

    def automatic(self, task: dict, config: LabelConfig) -> dict:
        mode, nums = self.auto
        if mode == "none":
            return {"result": [], "model_version": self.model_version}
        control = config.mask_control(self.auto_label)
        label = self.auto_label or (control.labels[0] if control.labels else "object")
        image = self.load_image(task, config, control.to_name)
        h, w = image.shape[:2]
        if mode == "everything":
            with self.lock:
                records = self.generator.generate(image, hq_token_only=self.hq_token_only)
            found = [(r["segmentation"], float(r["predicted_iou"])) for r in records]
        elif mode == "point":
            found = [self._predict(image, [[nums[0] * w / 100 - 0.5, nums[1] * h / 100 - 0.5]], [1], None)]
        else:
            found = [self._predict(image, None, None, [nums[0] * w / 100 - 0.5, nums[1] * h / 100 - 0.5,
                                                      nums[2] * w / 100 - 0.5, nums[3] * h / 100 - 0.5])]
        results = [r for mask, score in found if mask.any() for r in self._regions(mask, score, control, label)]
        out = {"result": results, "model_version": self.model_version}
        if found:
            out["score"] = float(np.mean([s for _, s in found]))
        return out

    def predict(self, payload: dict) -> dict:
        if not isinstance(payload, dict) or not isinstance(payload.get("tasks"), list):
            raise ValueError("the request needs a 'tasks' list")
        config = LabelConfig.parse(payload.get("label_config") or "")
        params = payload.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        results = []
        for task in payload["tasks"]:
            if context:
                results.append(self.interactive(task, context, config))
            else:
                results.append(self.automatic(task, config))
        return {"results": results}


def create_label_studio_app(model="samhq-tiny-shapes", label_studio_url: str | None = None, api_key: str | None = None,
                            *, allowed_hosts=(), basic_auth: tuple[str, str] | None = None, image_hosts=(),
                            fetch_timeout: float = 30.0, max_image_bytes: int = 256 * 2**20, **backend_options):
    """The FastAPI app of the ML backend (routes and access rules in the module docstring).

    backend_options go to `SamHQBackend` (device, dtype, max_images, auto, auto_label, multimask,
    hq_token_only, polygon_tolerance, points_per_side, pred_iou_thresh, stability_thresh,
    model_version). Raises ImportError without FastAPI (`pip install 'samhq[serve]'`), ValueError for
    bad options.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.middleware.cors import CORSMiddleware
        from fastapi.responses import JSONResponse
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError:
        raise ImportError("the Label Studio backend needs FastAPI: pip install 'samhq[serve]'") from None

    images = LabelStudioImages(label_studio_url, api_key, image_hosts, fetch_timeout, max_image_bytes)
    backend = SamHQBackend(model, images, **backend_options)
    app = FastAPI(title="samhq Label Studio ML backend")
    app.state.backend = backend

    hosts = sorted({*LOCAL_HOSTS, *(h.strip().lower() for h in allowed_hosts if h.strip())})
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    if images.origin:
        app.add_middleware(CORSMiddleware, allow_origins=[images.origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if basic_auth is not None:
        user, password = basic_auth
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        @app.middleware("http")
        async def check_basic_auth(request: Request, call_next):
            import hmac

            if not hmac.compare_digest(request.headers.get("authorization", ""), expected):
                return JSONResponse({"detail": "basic auth required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="samhq"'})
            return await call_next(request)

    async def body(request: Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise ValueError("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object")
        return data

    def error(e: Exception):
        code = 502 if isinstance(e, ImageFetchError) else 400
        return JSONResponse({"detail": str(e)}, status_code=code)

    @app.get("/")
    @app.get("/health")
    def health():
        return {"status": "UP", "model_class": "samhq", "model_version": backend.model_version}

    @app.post("/webhook")
    async def webhook():  # Label Studio registers one for every backend; samhq does not train from its events
        return {"status": "ignored", "detail": "samhq does not train from Label Studio events"}

    @app.get("/versions")
    def versions():
        return {"versions": [backend.model_version]}

    @app.post("/setup")
    async def setup(request: Request):
        try:
            LabelConfig.parse((await body(request)).get("schema") or "").mask_control()
        except ValueError as e:
            return error(e)
        return {"model_version": backend.model_version}

    @app.post("/predict")
    async def predict(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            payload = await body(request)
            start = time.perf_counter()
            out = await run_in_threadpool(backend.predict, payload)
            app.state.last_predict_s = time.perf_counter() - start
            return out
        except (ValueError, KeyError, TypeError) as e:
            return error(e if isinstance(e, ValueError) else ValueError(f"malformed request: {e}"))

    return app
