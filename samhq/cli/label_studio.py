"""`samhq label-studio`: a Label Studio ML backend serving SAM-HQ (see samhq.label_studio)."""
from __future__ import annotations

import os

from ._common import add_model_arg, new_command


def register(sub) -> None:
    p = new_command(
        sub, "label-studio",
        "Serve SAM-HQ as a Label Studio ML backend: masks for smart keypoints and boxes, and automatic pre-annotation.",
        "samhq label-studio --model sam_hq_vit_b.pth --port 9090 --label-studio-url http://localhost:8080 --api-key KEY\n"
        "  # then in Label Studio: project Settings > Model > Connect Model > http://localhost:9090, interactive on",
    )
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=9090, help="port (default 9090, Label Studio's usual backend port)")
    p.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"), metavar="URL",
                   help="Label Studio's address, to fetch task images from (default $LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"), metavar="KEY",
                   help="a Label Studio access token or personal access token (default $LABEL_STUDIO_API_KEY; "
                   "Account & Settings > Personal Access Token)")
    p.add_argument("--auto", default="everything", metavar="MODE",
                   help="pre-annotation of tasks without clicks: everything (default), none, point:X,Y or "
                   "box:X0,Y0,X1,Y1 in percent of the image")
    p.add_argument("--auto-label", metavar="LABEL", help="label of automatic masks (default: the mask control's first)")
    p.add_argument("--max-images", type=int, default=8, help="image embeddings kept in memory (default 8)")
    p.add_argument("--multimask", action="store_true", help="let SAM pick the best of three masks per prompt")
    p.add_argument("--hq-token-only", action="store_true", help="the HQ token's mask alone (else SAM + HQ)")
    p.add_argument("--polygon-tolerance", type=float, default=1.0, metavar="PX",
                   help="simplification of PolygonLabels answers in pixels (default 1)")
    p.add_argument("--points-per-side", type=int, default=32, help="everything mode's prompt grid (default 32)")
    p.add_argument("--pred-iou-thresh", type=float, default=None,
                   help="everything mode's minimum predicted IoU (default: the official generator's, 0.88 for SAM-HQ, "
                   "0.8 for SAM 2)")
    p.add_argument("--stability-thresh", type=float, default=0.95, help="everything mode's minimum stability (default 0.95)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name Label Studio reaches this backend by, besides localhost/127.0.0.1 (repeat)")
    p.add_argument("--image-host", action="append", default=[], metavar="NAME",
                   help="a host besides Label Studio that task image URLs may point to (fetched without the key; repeat)")
    p.add_argument("--basic-auth", default=os.environ.get("SAMHQ_BASIC_AUTH"), metavar="USER:PASSWORD",
                   help="require HTTP basic auth (set the same in Label Studio's model settings; default $SAMHQ_BASIC_AUTH)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    basic = None
    if args.basic_auth:
        user, sep, password = args.basic_auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--basic-auth expects USER:PASSWORD")
        basic = (user, password)
    try:
        import uvicorn
    except ImportError:
        raise ImportError("samhq label-studio needs uvicorn and FastAPI: pip install 'samhq[serve]'") from None
    from ..label_studio import create_label_studio_app, parse_auto

    parse_auto(args.auto)  # a bad --auto is a one-line error before the model loads
    hosts = list(args.allowed_host) + ([args.host] if args.host not in ("0.0.0.0", "::") else [])
    app = create_label_studio_app(
        args.model, args.label_studio_url, args.api_key, allowed_hosts=hosts, basic_auth=basic, image_hosts=args.image_host,
        device=args.device, dtype=args.dtype, max_images=args.max_images, auto=args.auto, auto_label=args.auto_label,
        multimask=args.multimask, hq_token_only=args.hq_token_only, polygon_tolerance=args.polygon_tolerance,
        points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh, stability_thresh=args.stability_thresh,
    )
    where = args.label_studio_url or "no Label Studio URL (images cannot be fetched: give --label-studio-url)"
    print(f"samhq label-studio: model {args.model} on http://{args.host}:{args.port}/ for {where}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
