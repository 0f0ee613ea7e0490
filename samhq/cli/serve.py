"""`samhq serve`: the click-to-segment web page and its JSON API (see samhq.server)."""
from __future__ import annotations

from ._common import add_image_args, add_model_arg, add_tile_args, new_command, tile_options


def register(sub) -> None:
    p = new_command(
        sub, "serve", "Serve a labelling web page and a JSON API (upload an image, prompt it by points and boxes, "
        "download the objects as COCO, YOLO, LabelMe or PNG).",
        "samhq serve --port 8000        # then open http://127.0.0.1:8000/\n"
        "  samhq serve --tiles --tile-cache-mb 2048   # large uploads segmented in tiles at their own resolution",
    )
    add_model_arg(p, low_memory=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-images", type=int, default=8, help="image embeddings kept in memory, least recently used "
                   "dropped first (default 8)")
    p.add_argument("--max-upload-mb", type=float, metavar="MB", help="refuse uploads over MB megabytes (MiB), "
                   "counted as they stream in (default 100)")
    p.add_argument("--max-request-kb", type=float, metavar="KB", help="refuse JSON requests over KB kilobytes (KiB) "
                   "(default 1024)")
    add_image_args(p, prompts=True)
    p.add_argument("--allowed-hosts", metavar="NAMES", help="comma-separated Host names to answer besides loopback, "
                   "e.g. seg.example.org behind a proxy ('*' for any; default: loopback names when bound to loopback, "
                   "any otherwise)")
    p.add_argument("--allowed-origins", metavar="ORIGINS", help="comma-separated origins whose pages may post uploads "
                   "and prompts besides this server's own, e.g. https://seg.example.org")
    add_tile_args(p, server=True)
    p.add_argument("--tile-cache-mb", type=float, default=1024, metavar="MB",
                   help="with --tiles: memory for the tile embeddings of all tiled images, oldest dropped (default 1024)")
    p.set_defaults(func=run)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    tiles = tile_options(args)
    for option, value in (("--max-upload-mb", args.max_upload_mb), ("--max-request-kb", args.max_request_kb),
                          ("--tile-cache-mb", args.tile_cache_mb)):
        if value is not None and not value > 0:
            raise ValueError(f"{option} must be positive, got {value}")
    try:
        import uvicorn
    except ImportError:
        raise ImportError("samhq serve needs uvicorn and FastAPI: pip install 'samhq[serve]'") from None
    from ..limits import get_limits
    from ..pipelines import load_for_inference
    from ..server import LOOPBACK_HOSTS, create_app

    limits = get_limits().replace(
        max_upload_bytes=None if args.max_upload_mb is None else int(args.max_upload_mb * 2**20),
        max_request_bytes=None if args.max_request_kb is None else int(args.max_request_kb * 2**10),
    )
    allowed_hosts = [*LOOPBACK_HOSTS, *_names(args.allowed_hosts)] if args.allowed_hosts else None
    model = load_for_inference(args.model, args.device, args.dtype, low_memory=args.low_memory)
    app = create_app(model, device=args.device, max_images=args.max_images, limits=limits, host=args.host,
                     allowed_hosts=allowed_hosts, allowed_origins=_names(args.allowed_origins), bit_depth=args.bit_depth,
                     name=str(args.model), tiles=tiles, tile_cache_bytes=int(args.tile_cache_mb * 2**20))
    tiled = "" if tiles is None else f", uploads larger than {app.state.session.tiled.tile_size} px in tiles"
    print(f"samhq serve: model {args.model} on http://{args.host}:{args.port}/{tiled}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
