"""Progress on long steps: a tqdm bar on a terminal, throttled plain lines elsewhere, silence on request."""

from __future__ import annotations

import io
import re

import pytest

from glmtune.evaluate import predict
from glmtune.progress import Progress, track


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_carry_count_percent_and_eta():
    out = io.StringIO()
    with Progress(4, "scoring", "rows", stream=out, enabled=True, interval=0, quiet_below=0) as p:
        for _ in range(4):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [re.match(r"scoring: (\d)/4 rows \((\d+)%\)", line).groups() for line in lines] == [
        ("1", "25"),
        ("2", "50"),
        ("3", "75"),
        ("4", "100"),
    ]
    assert all("ETA" in line for line in lines[:3])
    assert lines[-1].endswith(tuple(f"done in 00:0{i}" for i in range(10)))


def test_plain_lines_are_throttled_and_short_steps_stay_silent():
    out = io.StringIO()
    # The default interval (30 s) and quiet_below (5 s): a fast step prints nothing at all.
    for _ in track(range(1000), "tokenizing", "rows", stream=out, enabled=True):
        pass
    assert out.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    out = FakeTTY()
    for _ in track(range(3), "predict", "rows", stream=out, enabled=True):
        pass
    text = out.getvalue()
    # tqdm redraws in place (carriage returns) and clears the bar when done (leave=False).
    assert text.startswith("\rpredict:   0%") and "0/3" in text and text.endswith("\r")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("GLMTUNE_PROGRESS", "0")
    out = FakeTTY()
    assert list(track(range(3), "x", stream=out, interval=0, quiet_below=0)) == [0, 1, 2]
    assert out.getvalue() == ""


class _Engine:
    """Just enough of inference.Engine for evaluate.predict: echoes the prompt."""

    def generate(self, prompts, settings):
        return [type("C", (), {"text": p[-1]["content"].upper()})() for p in prompts]


@pytest.mark.parametrize("progress", [True, False])
def test_predict_reports_rows_not_batches(monkeypatch, capsys, progress):
    monkeypatch.setenv("GLMTUNE_PROGRESS_INTERVAL", "0")
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    outputs = predict(_Engine(), prompts, settings=None, batch_size=2, progress=progress, desc="scoring")
    assert outputs == [f"Q{i}" for i in range(5)]
    err = capsys.readouterr().err
    if progress:
        assert re.findall(r"scoring: (\d)/5 rows", err) == ["2", "4", "5"]
    else:
        assert err == ""


def test_model_loading_reports_mib_read(tmp_path, monkeypatch, capsys):
    import glmtune
    from glmtune.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "chatglm3")
    monkeypatch.setenv("GLMTUNE_PROGRESS_INTERVAL", "0")
    glmtune.load_model(path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loading weights:")]
    size_mib = max(1, sum(f.stat().st_size for f in path.glob("*.safetensors")) >> 20)
    assert lines and lines[-1].startswith(f"loading weights: {size_mib}/{size_mib} MiB (100%), done in")
