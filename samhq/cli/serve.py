"""`samhq serve`: the click-to-segment web page and its JSON API (see samhq.server)."""
from __future__ import annotations

from ._common import add_model_arg, new_command


def register(sub) -> None:
    p = new_command(
        sub, "serve", "Serve a click-to-segment web page and a JSON API (upload an image, prompt it by points and boxes).",
        "samhq serve --port 8000        # then open http://127.0.0.1:8000/",
    )
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-images", type=int, default=8, help="image embeddings kept in memory (default 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        import uvicorn
    except ImportError:
        raise ImportError("samhq serve needs uvicorn and FastAPI: pip install 'samhq[serve]'") from None
    from ..pipelines import load_for_inference
    from ..server import create_app

    model = load_for_inference(args.model, args.device, args.dtype)
    app = create_app(model, device=args.device, max_images=args.max_images, name=str(args.model))
    print(f"samhq serve: model {args.model} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
