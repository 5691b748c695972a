"""tensorrt_llm_bls: the deterministic CPU test LLM; the implementation and its rules are in
../../testllm_core/testllm.py (shared by the test models; the end shape comes from config.pbtxt)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testllm_core"))

from testllm import TestLLM as TritonPythonModel

__all__ = ["TritonPythonModel"]
