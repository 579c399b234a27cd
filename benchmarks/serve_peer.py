"""The peer serve_load.py holds ootd against: the same OutfitPipeline behind plain FastAPI + uvicorn, one process.

What a user would write without Ray: no batching, no validation beyond FastAPI's, Milvus Lite opened in-process.
The pipeline and the store are not thread-safe (ultralytics' predictor; Milvus Lite's file), so each is used by
one request at a time; FastAPI runs these sync routes on its thread pool, so uploads parse while one computes.

    .venv/bin/python benchmarks/serve_peer.py --model-dir DIR --port 8001 --set store.uri=/tmp/x/milvus.db
"""

from __future__ import annotations

import argparse
import threading
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from ootd.config import load_config
from ootd.serve.pipeline import OutfitPipeline
from ootd.store.milvus import MilvusStore

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model-dir", required=True)
parser.add_argument("--port", type=int, default=8001)
parser.add_argument("--config", default="tiny")
parser.add_argument("--set", action="append", default=[], dest="overrides")
args = parser.parse_args()
cfg = load_config(args.config, args.overrides)
pipeline = OutfitPipeline(cfg, args.model_dir)
store = MilvusStore.from_config(cfg.store, dim=pipeline.embed_dim)
pipeline_lock, store_lock = threading.Lock(), threading.Lock()
app = FastAPI()


def embed_one(data: bytes) -> dict:
    with pipeline_lock:
        result = pipeline.run([data])[0]
    return {"embedding": result["embedding"].tolist(), "model_version": result["model_version"],
            "outfit": {k: result[k] for k in ("box", "det_score", "n_garments", "fallback", "width", "height")}}


def search(vector: list[float], top_k: int) -> list[dict]:
    with store_lock:
        hits = store.search([vector], top_k)[0]
    return [{"id": h.id, "score": h.score, "style": h.style, "source": h.source, "box": h.box} for h in hits]


@app.post("/v1/embed")
def embed(image: Annotated[UploadFile, File()]) -> dict:
    return embed_one(image.file.read())


@app.post("/v1/search")  # ootd's one route: a photo (multipart) or a vector (JSON)
async def search_route(request: Request) -> dict:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        result = await run_in_threadpool(embed_one, await form["image"].read())
        vector, top_k, version = result["embedding"], int(form.get("top_k", 10)), result["model_version"]
    else:
        body = await request.json()
        vector, top_k, version = body["vector"], int(body.get("top_k", 10)), None
    return {"results": await run_in_threadpool(search, vector, top_k), "model_version": version}


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
