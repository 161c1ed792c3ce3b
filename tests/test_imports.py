"""The model core needs torch and nothing else: importing it, in a fresh interpreter, loads none of the packages
that text (tiktoken), checkpoints (safetensors), model parallelism (fairscale) or the test oracles need."""

import json
import subprocess
import sys

import pytest

HEAVY = ("fairscale", "safetensors", "tiktoken", "transformers", "tokenizers")


def loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("statement", ["import llama31.model", "import llama31.model.rope",
                                       "from llama31 import Transformer, ModelArgs"])
def test_the_model_core_imports_torch_alone(statement):
    modules = loaded_after(statement)
    assert not [m for m in modules if m.split(".")[0] in HEAVY], statement
    ours = {m for m in modules if m.split(".")[0] == "llama31"}
    # the configuration, its error type (llama31.errors: the standard library alone) and the model
    allowed = {"llama31", "llama31.config", "llama31.errors"} | {m for m in ours if m.startswith("llama31.model")}
    assert ours <= allowed, sorted(ours)


def test_the_package_still_offers_everything_on_first_use():
    modules = loaded_after("from llama31 import Llama, Tokenizer, ChatFormat; import llama31; "
                           "assert llama31.Llama.__module__ == 'llama31.generation'")
    assert "tiktoken" in modules and "fairscale" not in modules  # one process never needs fairscale
