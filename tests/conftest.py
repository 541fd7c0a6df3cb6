"""Shared fixtures: a small synthetic corpus built once per test session."""

from __future__ import annotations

import pytest
import torch

from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """300 trailers, all six streams (read-only: copy before modifying)."""
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, SynthConfig(num_trailers=300, seed=1), progress=False)
    return out
