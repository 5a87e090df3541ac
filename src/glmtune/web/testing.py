"""Helpers for the web UI's browser tests and screenshots: a tiny LoRA adapter, a server in a
background thread on a free loopback port, fake engines, and a headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "FixedEngine",
    "chromium_missing",
    "free_port",
    "launch_chromium",
    "make_tiny_lora",
    "serve_in_background",
]

CHROMIUM = os.environ.get("GLMTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class FixedEngine:
    """An engine stand-in that answers every prompt with ``reply`` (streamed in a few pieces)."""

    def __init__(self, reply: str):
        self.reply = reply
        self.calls: list[list[dict]] = []

    def stream(self, messages, settings=None):
        self.calls.append(messages)
        step = max(1, len(self.reply) // 3)
        for i in range(0, len(self.reply), step):
            yield self.reply[i : i + step]


def make_tiny_lora(model_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A random (non-zero) LoRA adapter for a tiny model, so that base and tuned answers differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.loading import load_model

    torch.manual_seed(seed)
    model = load_model(model_dir)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in ("q_proj", "v_proj", "query_key_value") if t in names] or sorted(names)[:2]
    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # make the adapter change the answers visibly
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_background(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a Blocks app on a free loopback port in a background thread; yields its URL."""
    from .app import launch

    launch(app, host, free_port(host), block=False, quiet=True)
    try:
        yield app.local_url.rstrip("/")
    finally:
        app.close()


def chromium_missing() -> str | None:
    """Why the browser can't run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return (
            f"{CHROMIUM} is absent (install Debian's chromium: apt-get install chromium, or `make browser`)"
        )
    return None


def launch_chromium(playwright, extra_args: list[str] | None = None):
    """Debian's Chromium, headless, with no background network traffic."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + list(extra_args or [])
    )
