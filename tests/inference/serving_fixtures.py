"""Shared pieces of the chat, server and web page tests: a random tiny checkpoint on disk, test images,
and an in-process server on a free loopback port."""

from __future__ import annotations

import base64
import contextlib
import io
import pathlib
import socket
import threading
import time

import numpy as np
from flax import nnx
from PIL import Image

from llava_jax.models import Llava
from llava_jax.models.presets import get_preset


def write_tiny_checkpoint(directory: pathlib.Path, *, template: str = "v1", seed: int = 0) -> pathlib.Path:
    """A stage directory (model.json + final_params) holding a random `tiny` LLaVA."""
    from llava_jax.checkpoint.params import save_params
    from llava_jax.checkpoint.stage_dir import write_model_info

    cfg = get_preset("tiny")
    model = Llava(cfg, rngs=nnx.Rngs(seed))
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory / "final_params", nnx.state(model).to_pure_dict())
    write_model_info(directory, cfg, template, "pad")
    return directory


# How long a test waits for a server to start or a request to be answered. Only a hang should reach
# it: on a loaded machine a server's warm-up compilation alone can take minutes.
PATIENCE = 900.0

_SHARED: dict = {}


def shared_checkpoint(tmp_path_factory) -> pathlib.Path:
    """One random tiny checkpoint per test session (creating a model takes seconds)."""
    if "checkpoint" not in _SHARED:
        _SHARED["checkpoint"] = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llava") / "stage2")
    return _SHARED["checkpoint"]


def shared_chat_model(tmp_path_factory):
    """The shared checkpoint loaded as a `ChatModel` (read-only: tests must not change it)."""
    from llava_jax.inference.chat_model import ChatModel

    if "chat" not in _SHARED:
        _SHARED["chat"] = ChatModel.from_checkpoint(shared_checkpoint(tmp_path_factory))
    return _SHARED["chat"]


def png_bytes(width: int = 80, height: int = 60, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, *, timeout: float = PATIENCE):
    """Serve a FastAPI app with uvicorn on 127.0.0.1 in a thread; yields the base URL, stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
