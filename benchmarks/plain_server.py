"""The plain server a user would otherwise write: ``bench serving``'s baseline side.

One process, FastAPI on uvicorn, the same checkpoint as ``GatedModel.for_inference()``, no Ray, no
batching: each request is decoded and run on its own, on the event loop. Only ``/v1/predict``
(one image per request, raw body) and the readiness route, answered as skipserve answers them.

    python -m benchmarks.plain_server --checkpoint default --port 8001 --threads 1
"""
import argparse

import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse


def make_app(checkpoint: str, threads: int) -> FastAPI:
    from gating.model import GatedModel
    from gating.zoo import resolve_checkpoint
    from serving.images import Limits, RequestError, decode_image_bytes
    from training.data import normalize

    torch.set_num_threads(threads)
    model = GatedModel.load(resolve_checkpoint(checkpoint)).for_inference()
    card, limits, size = model.card, Limits(), tuple(model.card.input_size[1:])
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            pixels = decode_image_bytes(await request.body(), limits, size)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        with torch.inference_mode():
            out = model(normalize(pixels[None], card.mean, card.std))
        p = out.logits.softmax(1)[0]
        i = int(p.argmax())
        return JSONResponse({"label": card.class_names[i], "index": i, "probability": float(p[i]),
                             "units_executed": int(out.units_executed[0]), "policy": model.policy.to_dict()})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1, help="torch threads (as one skipserve replica has)")
    args = p.parse_args()
    uvicorn.run(make_app(args.checkpoint, args.threads), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
