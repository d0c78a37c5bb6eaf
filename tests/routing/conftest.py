"""Seed torch before every routing test so random inputs are the same on every run."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
