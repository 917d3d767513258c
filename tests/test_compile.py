"""`--compile` for real: torch.compile (inductor, C++ on this CPU) compiles the model body and a short
run trains as the eager one does. The stub test in test_lora.py checks which module is compiled
under LoRA; this one runs the compiler."""

from __future__ import annotations

import shutil

import pytest
import torch

from dpokit.config import build_config
from dpokit.train.loop import train


def _run(model_dir, data, out, compile_body: bool):
    cfg = build_config({"model": {"model": str(model_dir)}, "data": {"data": str(data), "max_length": 32},
                        "train": {"output": str(out), "batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
                                  "progress": "off"},
                        "speed": {"compile": compile_body}})
    result = train(cfg, log=lambda _: None)
    [step] = [r for r in result.history if "loss" in r]
    return {name: step[name] for name in ("loss", "logps/chosen", "logps/rejected", "grad_norm")}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compile_trains_like_eager(tiny_model_dir, toy_data, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = _run(tiny_model_dir, toy_data[0], tmp_path / "compiled", compile_body=True)
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])  # dynamo really compiled the body
    eager = _run(tiny_model_dir, toy_data[0], tmp_path / "eager", compile_body=False)
    # The compiled forward gives the log-probs, the compiled backward the gradient. Inductor fuses and
    # reorders float32 reductions: they agree to float noise (~1e-6 relative), not bitwise.
    assert compiled == pytest.approx(eager, rel=1e-4), (compiled, eager)
    torch._dynamo.reset()
