"""Base models from anywhere a user has them: a hub id, a local directory, a GGUF file or one in a package."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.base_model import BaseModelError, find_gguf, resolve_base_model
from trainer.chat_format import template_messages


def test_a_local_directory_and_a_hub_id_are_used_as_they_are(tiny_model: Path) -> None:
    assert resolve_base_model(str(tiny_model)).path == str(tiny_model)
    assert (
        resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct").path
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_a_directory_that_is_no_model_and_a_missing_gguf_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match=r"config\.json"):
        resolve_base_model(str(tmp_path))
    with pytest.raises(BaseModelError, match=r"no GGUF file at .*nowhere\.gguf"):
        resolve_base_model(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(BaseModelError, match="no GGUF file"):
        resolve_base_model("no_such_package_xyz/model.gguf")


def test_a_gguf_inside_an_installed_package_is_found_without_importing_the_package(smollm2: str) -> None:
    found = find_gguf(smollm2)
    assert found is not None and found.is_file() and found.name.endswith(".gguf")
    assert find_gguf(str(found)) == found  # the same file by its path


def test_a_gguf_is_converted_once_into_a_directory_that_loads_and_answers(smollm2: str) -> None:
    results = []
    # Two concurrent users of the same file: one conversion, one directory.
    threads = [threading.Thread(target=lambda: results.append(resolve_base_model(smollm2))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = results
    assert first.path == second.path and first.name == smollm2
    path = Path(first.path)
    marker = json.loads((path / "distillgate_source.json").read_text())
    assert marker["dtype"] == "bfloat16" and len(marker["sha256"]) == 64
    assert oct(os.stat(path).st_mode & 0o777) == "0o755"
    mtime = (path / "model.safetensors").stat().st_mtime
    assert resolve_base_model(smollm2).path == first.path
    assert (path / "model.safetensors").stat().st_mtime == mtime  # not converted again

    tokenizer = AutoTokenizer.from_pretrained(first.path)
    model = AutoModelForCausalLM.from_pretrained(first.path)
    messages = template_messages([{"role": "user", "content": "What is the capital of France?"}])
    encoded: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = encoded["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids.shape[1] :])
